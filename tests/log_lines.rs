//! Issue 17, point 5: workers' lines the way collectors want them
//! (`log_lines`): `prefix` (today's `[worker N] `, with `log_timestamps` an
//! RFC 3339 time first), `raw` (untouched: a JSON logger's lines stay
//! JSON), `json` (each line one object naming its slot, pid and stream).

mod common;

use common::*;

/// A worker that prints a JSON log line on stdout and a plain one on
/// stderr, then serves.
fn chatty_worker() -> Vec<String> {
    let script = format!(
        "echo '{{\"level\":\"info\",\"msg\":\"up\"}}'; echo 'plain words' >&2; exec {}",
        hello_worker()
    );
    vec!["sh".into(), "-c".into(), script]
}

fn launch(name: &str, config: &str) -> (Herd, u32) {
    let command = chatty_worker();
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let herd = Herd::launch(name, Some(config), 1, &[], &command);
    let pid = herd.wait_ready(1)[&0];
    (herd, pid)
}

/// herd's output lines (stdout and stderr) that contain `needle`, once
/// `count` of them are there.
fn lines_with(herd: &Herd, needle: &str, count: usize) -> Vec<String> {
    wait_until(&format!("{count} output lines with {needle:?}"), || {
        let lines: Vec<String> = herd
            .log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect();
        (lines.len() >= count).then_some(lines)
    })
}

#[test]
fn raw_lines_are_the_workers_own() {
    let (herd, _) = launch("log-lines-raw", "log_lines = \"raw\"\n");
    let lines = lines_with(&herd, "\"msg\":\"up\"", 1);
    assert_eq!(lines, [r#"{"level":"info","msg":"up"}"#]);
    assert_eq!(lines_with(&herd, "plain words", 1), ["plain words"]);
    assert!(herd.stop().success());
}

#[test]
fn json_lines_name_the_slot_pid_and_stream() {
    let (herd, pid) = launch("log-lines-json", "log_lines = \"json\"\n");
    let parse = |needle: &str| -> Value {
        let line = lines_with(&herd, needle, 1).remove(0);
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    // The worker's own JSON is a string inside herd's object.
    let out = parse("msg\\\":\\\"up");
    assert_eq!(out["line"], r#"{"level":"info","msg":"up"}"#);
    assert_eq!(
        (out["slot"].clone(), out["pid"].clone()),
        (json!(0), json!(pid))
    );
    assert_eq!(out["stream"], "stdout");
    assert!(
        out["ts"].as_str().is_some_and(|ts| ts.ends_with('Z')),
        "{out}"
    );
    let err = parse("plain words");
    assert_eq!(
        (err["line"].clone(), err["stream"].clone()),
        (json!("plain words"), json!("stderr"))
    );
    assert!(herd.stop().success());
}

#[test]
fn prefix_lines_carry_a_timestamp_when_asked() {
    let (herd, _) = launch("log-lines-stamped", "log_timestamps = true\n");
    let line = lines_with(&herd, "plain words", 1).remove(0);
    let (stamp, rest) = line.split_once(' ').unwrap();
    assert_eq!(rest, "[worker 0] plain words", "{line}");
    // 2026-12-01T18:51:00.123456Z
    assert_eq!(stamp.len(), 27, "{line}");
    assert!(
        stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
        "{line}"
    );
    assert!(herd.stop().success());
}

#[test]
fn a_bad_log_lines_value_is_refused_by_name() {
    let dir = scratch_dir("log-lines-bad");
    let config = write_config(&dir, "log_lines = \"text\"\nlog_timestamps = \"yes\"\n");
    let check = herd_cli(
        &dir,
        &[
            "check",
            "-c",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--",
            hello_worker(),
        ],
    );
    assert_eq!(check.code, Some(1), "{check:?}");
    assert!(
        check
            .stderr
            .contains("invalid `log_lines` = \"text\": expected one of: prefix, raw, json"),
        "{check:?}"
    );
}

#[test]
fn log_files_per_slot_are_written_and_herd_logs_shows_and_follows_them() {
    let dir = scratch_dir("log-files");
    let logs = dir.join("logs");
    let config = write_config(
        &dir,
        &format!("log_dir = {:?}\n", logs.display().to_string()),
    );
    let config = config.display().to_string();
    let command = chatty_worker();
    let mut args = vec![
        "-c",
        config.as_str(),
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--",
    ];
    args.extend(command.iter().map(String::as_str));
    let herd = Herd::start_in(&dir, &args);
    herd.wait_ready(2);
    herd.wait_for_event("log_files", &[], 1);
    // Each slot's stdout and stderr in files of their own, each line timestamped.
    let read = |name: &str| {
        wait_until(&format!("{name} written"), || {
            std::fs::read_to_string(logs.join(name))
                .ok()
                .filter(|t| !t.is_empty())
        })
    };
    for slot in 0..2 {
        let out = read(&format!("worker-{slot}.out.log"));
        let (stamp, line) = out.trim_end().split_once(' ').unwrap();
        assert!(stamp.ends_with('Z') && stamp.len() == 27, "{out}");
        assert_eq!(line, r#"{"level":"info","msg":"up"}"#);
        assert!(read(&format!("worker-{slot}.err.log")).ends_with(" plain words\n"));
    }
    // herd logs: the last lines, tagged by slot.
    let shown = herd_cli(&dir, &["logs", "-c", &config, "--slot", "1"]);
    assert_eq!(shown.code, Some(0), "{shown:?}");
    let lines: Vec<&str> = shown.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{shown:?}");
    assert!(
        lines.iter().all(|l| l.starts_with("[worker 1] 20")),
        "{shown:?}"
    );
    // --follow: a slot added later shows up as it writes. `--lines 1`
    // shows a line of each file there is first, so the test knows it has
    // looked before slot 2 exists (a file already there when it looks is
    // followed from its end).
    let mut follow = std::process::Command::new(herd_bin())
        .args(["logs", "-c", &config, "--follow", "--lines", "1"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    wait_until("herd logs --follow to show what is there", || {
        rx.recv_timeout(std::time::Duration::from_millis(100))
            .ok()
            .filter(|line| line.starts_with("[worker 1] "))
    });
    let scaled = herd.control(&["scale", "3"]);
    assert_eq!(scaled.code, Some(0), "{scaled:?}");
    let seen = wait_until("herd logs --follow to show slot 2", || {
        rx.recv_timeout(std::time::Duration::from_millis(100))
            .ok()
            .filter(|line| line.starts_with("[worker 2] "))
    });
    assert!(
        seen.contains("plain words") || seen.contains("\"msg\":\"up\""),
        "{seen}"
    );
    follow.kill().unwrap();
    follow.wait().unwrap();
    assert!(herd.stop().success());
}

#[test]
fn herd_logs_without_a_log_dir_says_so() {
    let dir = scratch_dir("log-files-none");
    let shown = herd_cli(&dir, &["logs"]);
    assert_eq!(shown.code, Some(1), "{shown:?}");
    assert!(shown.stderr.contains("sets no `log_dir`"), "{shown:?}");
}
