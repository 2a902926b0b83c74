//! `herd compare` as a process: real herds with real workers (hello-worker,
//! a Python worker whose bodies name no worker, gunicorn), one per mode and
//! scenario, short runs; the table, the files it writes, where each row's
//! spread comes from, the settings it passes to every `herd run`, and its
//! answers to bad arguments and to modes that do not start.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;

/// Column indexes of a table row split on whitespace (before the note).
const REQUESTS: usize = 2;
const ERRORS: usize = 8;
const MAX_MIN: usize = 10;
const SPREAD_FROM: usize = 12;
/// A measured row's cells without a note: up to `RSS MiB` and `herd CPU µs/conn`.
const MEASURED_CELLS: usize = SPREAD_FROM + 3;

/// Long enough for six short runs of a slow-starting server (gunicorn) on a
/// loaded 2-core machine.
const LONG_DEADLINE: Duration = Duration::from_secs(120);

/// `herd compare ARGS` in `dir`, bounded by [`LONG_DEADLINE`].
fn compare_long(dir: &Path, args: &[&str]) -> CliRun {
    let mut full = vec!["compare"];
    full.extend_from_slice(args);
    herd_cli_within(dir, &full, LONG_DEADLINE).unwrap_or_else(|e| panic!("{e}"))
}

/// gunicorn, from PyPI into `.venv-tests` by scripts/test (or
/// `HERD_TEST_GUNICORN`), as tests/readiness.rs finds it.
fn gunicorn() -> Option<String> {
    let path = std::env::var("HERD_TEST_GUNICORN")
        .unwrap_or_else(|_| format!("{}/.venv-tests/bin/gunicorn", env!("CARGO_MANIFEST_DIR")));
    Path::new(&path).exists().then_some(path)
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `herd compare ARGS` in `dir` (bounded by `DEADLINE` through `herd_cli`).
fn compare(dir: &Path, args: &[&str]) -> CliRun {
    let mut full = vec!["compare"];
    full.extend_from_slice(args);
    herd_cli(dir, &full)
}

/// The table rows on stdout: (scenario, mode) → the row's cells.
fn table_rows(stdout: &str) -> BTreeMap<(String, String), Vec<String>> {
    stdout
        .lines()
        .filter(|l| {
            ["uniform ", "stalled ", "connect "]
                .iter()
                .any(|s| l.starts_with(s))
        })
        .map(|l| {
            let cells: Vec<String> = l.split_whitespace().map(str::to_string).collect();
            ((cells[0].clone(), cells[1].clone()), cells)
        })
        .collect()
}

/// CSV lines after the header, as (scenario, mode) → field name → value.
/// Only the last field (the note) can be quoted, and it is empty when a row
/// was measured, so splitting on commas is enough for measured rows.
fn csv_rows(csv: &str) -> BTreeMap<(String, String), BTreeMap<String, String>> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .map(|line| {
            let fields: BTreeMap<String, String> = header
                .iter()
                .zip(line.split(','))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            ((fields["scenario"].clone(), fields["mode"].clone()), fields)
        })
        .collect()
}

#[test]
fn compare_prints_a_row_per_mode_and_scenario_and_writes_the_files() {
    let dir = scratch_dir("compare-table");
    let out = dir.join("out");
    let out_arg = out.display().to_string();
    let modes = ["round-robin", "sticky", "least-conn", "shared", "reuseport"];
    let run = compare(
        &dir,
        &[
            "--modes",
            "round-robin,sticky,least-conn,shared,reuseport",
            "--workers",
            "2",
            "--duration",
            "500ms",
            "--scenarios",
            "uniform,stalled",
            "--out",
            &out_arg,
            "--",
            hello_worker(),
        ],
    );
    assert_eq!(run.code, Some(0), "{run:?}");

    // stdout: one table row per scenario and mode, each with requests.
    let rows = table_rows(&run.stdout);
    assert_eq!(rows.len(), 10, "{}", run.stdout);
    for scenario in ["uniform", "stalled"] {
        for mode in modes {
            let cells = rows
                .get(&(scenario.to_string(), mode.to_string()))
                .unwrap_or_else(|| panic!("no {scenario}/{mode} row in\n{}", run.stdout));
            let requests: u64 = cells[2]
                .parse()
                .unwrap_or_else(|_| panic!("{scenario}/{mode}: {cells:?}"));
            assert!(requests > 0, "{scenario}/{mode}: {cells:?}");
        }
    }
    assert!(run
        .stdout
        .lines()
        .any(|l| l.starts_with("scenario") && l.contains("p99 ms") && l.contains("Jain")));
    // hello-worker's bodies name their worker: every spread is from them.
    for (key, cells) in &rows {
        assert_eq!(cells[SPREAD_FROM], "bodies", "{key:?}: {cells:?}");
    }

    // The files.
    let read = |name: &str| {
        std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let csv = read("compare.csv");
    assert_eq!(csv.lines().next(), Some(herd_tooling::compare::CSV_HEADER));
    assert!(csv.starts_with("scenario,mode,requests,"), "{csv}");
    let csv = csv_rows(&csv);
    assert_eq!(csv.len(), 10, "{csv:#?}");
    for ((scenario, mode), fields) in &csv {
        let number = |name: &str| -> u64 {
            fields[name]
                .parse()
                .unwrap_or_else(|_| panic!("{scenario}/{mode} {name}: {fields:?}"))
        };
        assert!(number("requests") > 0, "{scenario}/{mode}: {fields:?}");
        assert!(
            number("primary_rss_bytes") > 0,
            "{scenario}/{mode}: {fields:?}"
        );
        assert!(
            number("p50_us") <= number("max_us"),
            "{scenario}/{mode}: {fields:?}"
        );
    }
    // Round-robin keeps sending new connections to the stopped worker (it
    // stays eligible until max_unacked or ack_timeout): some must time out,
    // which shows the worker really was stopped during the load.
    let stalled_rr = &csv[&("stalled".to_string(), "round-robin".to_string())];
    assert!(
        stalled_rr["timeouts"].parse::<u64>().unwrap() > 0,
        "{stalled_rr:?}"
    );

    let md = read("compare.md");
    assert!(md.starts_with("# herd compare"), "{md}");
    assert!(
        md.contains("compare --modes round-robin,sticky,least-conn,shared,reuseport --workers 2"),
        "the exact command: {md}"
    );
    assert_eq!(
        md.lines().filter(|l| l.starts_with("| ")).count(),
        1 + 10,
        "header and a row per scenario and mode: {md}"
    );

    let svg = read("compare.svg");
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
    for mode in modes {
        assert!(svg.contains(&format!(">{mode}</text>")), "{mode}: {svg}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn compare_refuses_bad_arguments_and_starts_nothing() {
    let dir = scratch_dir("compare-bad-args");
    for (args, problem) in [
        (&["--modes", "round-robin,fastest"][..], "fastest"),
        (&["--scenarios", "uniform,slow"], "slow"),
        (&["--modes", "sticky,sticky"], "twice"),
        (&["--workers", "1", "--scenarios", "stalled"], "stalled"),
        (&["--duration", "1s", "--timeout", "2s"], "--timeout"),
        (&["--duration", "11m"], "--duration"),
        (&["--ready", "soon"], "invalid --ready \"soon\""),
        (
            &["--ready", "delay:forever"],
            "invalid --ready \"delay:forever\"",
        ),
        (
            &["--stop-signal", "SIGKILL"],
            "invalid --stop-signal \"SIGKILL\"",
        ),
        (
            &["--stop-signal", "SIGNOPE"],
            "invalid --stop-signal \"SIGNOPE\"",
        ),
        (
            &["--listen", "localhost:3000"],
            "invalid --listen \"localhost:3000\"",
        ),
        (&["--listen", "127.0.0.1"], "invalid --listen \"127.0.0.1\""),
        (
            &["--config", "/no/such/herd.toml"],
            "--config /no/such/herd.toml",
        ),
    ] {
        let mut full = args.to_vec();
        full.extend(["--", hello_worker()]);
        let run = compare(&dir, &full);
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.stderr.contains(problem), "{args:?}: {run:?}");
        assert!(run.stdout.is_empty(), "{args:?}: {run:?}");
    }
    // No worker command at all.
    let run = compare(&dir, &["--modes", "round-robin"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_mode_that_does_not_start_is_a_row_with_a_note() {
    let dir = scratch_dir("compare-missing-worker");
    // herd refuses a worker program that does not exist, in every mode:
    // every row carries herd's own message, and nothing was measured (exit 1).
    let missing = dir.join("no-such-worker").display().to_string();
    let run = compare(
        &dir,
        &[
            "--modes",
            "round-robin,least-conn",
            "--scenarios",
            "uniform",
            "--duration",
            "200ms",
            "--",
            &missing,
        ],
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    let rows = table_rows(&run.stdout);
    assert_eq!(rows.len(), 2, "{}", run.stdout);
    for line in run.stdout.lines().filter(|l| l.starts_with("uniform ")) {
        assert!(
            line.contains("herd exited") && line.contains("no-such-worker"),
            "{line}"
        );
    }
    assert!(run.stderr.contains("no mode could be measured"), "{run:?}");

    // One mode failing does not stop the others. (`shared` may or may not be
    // implemented by this build: either it is measured or its row says why not.)
    let run = compare(
        &dir,
        &[
            "--modes",
            "round-robin,shared",
            "--scenarios",
            "uniform",
            "--duration",
            "200ms",
            "--",
            hello_worker(),
        ],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let rows = table_rows(&run.stdout);
    let rr = &rows[&("uniform".to_string(), "round-robin".to_string())];
    assert!(rr[2].parse::<u64>().unwrap() > 0, "{rr:?}");
    let shared = &rows[&("uniform".to_string(), "shared".to_string())];
    assert!(
        shared[2].parse::<u64>().is_ok_and(|n| n > 0) || shared.join(" ").contains("shared"),
        "{shared:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Rows as `herd compare --json` has them, by (scenario, mode).
fn json_rows(stdout: &str) -> BTreeMap<(String, String), Value> {
    let report: Value = serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let key = (
                row["scenario"].as_str().unwrap().to_string(),
                row["mode"].as_str().unwrap().to_string(),
            );
            (key, row.clone())
        })
        .collect()
}

/// A herd-protocol worker whose bodies say only `hello`: no pid to count,
/// so the spread comes from herd's own per-slot counts, in the hand-off
/// mode (hand-offs) and the OS modes (what the worker reports accepting),
/// and herd counted every connection the load opened.
#[test]
fn without_pids_in_the_bodies_the_spread_comes_from_herds_counts() {
    let dir = scratch_dir("compare-herd-counts");
    let worker = fixture("anonymous_worker.py");
    let run = compare_long(
        &dir,
        &[
            "--modes",
            "round-robin,shared,reuseport",
            "--scenarios",
            "connect",
            "-n",
            "200",
            "--json",
            "--",
            &worker,
        ],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let rows = json_rows(&run.stdout);
    assert_eq!(rows.len(), 3, "{}", run.stdout);
    for ((_, mode), row) in &rows {
        let bench = &row["bench"];
        assert_eq!(bench["succeeded"], json!(200), "{mode}: {row:#}");
        assert_eq!(
            bench["workers"],
            json!([]),
            "{mode}: bodies name no pid: {row:#}"
        );
        assert_eq!(row["spread_from"], json!("herd"), "{mode}: {row:#}");
        assert!(
            row["fairness"]["jain_index"].as_f64().unwrap() > 0.0,
            "{mode}: {row:#}"
        );
        let counts: Vec<u64> = row["herd_counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        assert_eq!(counts.len(), 2, "a count per slot: {row:#}");
        assert_eq!(
            counts.iter().sum::<u64>(),
            bench["connections_opened"].as_u64().unwrap(),
            "{mode}: herd counted every connection: {row:#}"
        );
    }
    // Round-robin deals strictly in turn: 100 each.
    let rr = &rows[&("connect".to_string(), "round-robin".to_string())];
    assert_eq!(rr["herd_counts"], json!([100, 100]), "{rr:#}");
    assert_eq!(rr["fairness"]["max_min_ratio"], json!(1.0), "{rr:#}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `herd compare --ready notify -- gunicorn ...`: the modes a server that
/// cannot take hand-offs runs in, by default, side by side. Shared and
/// reuseport serve every request; gunicorn reports nothing to herd, so in
/// shared no one counts per worker and the row says so instead of a number.
/// `kernel` may not start in this build: its row has a measurement or a note.
#[test]
fn compare_measures_gunicorn_ready_by_notify_in_every_mode_it_can_run() {
    let Some(gunicorn) = gunicorn() else {
        skip_unless_ci(
            "compare_measures_gunicorn_ready_by_notify_in_every_mode_it_can_run",
            "needs gunicorn in .venv-tests (scripts/test installs it)",
        );
        return;
    };
    let dir = scratch_dir("compare-gunicorn");
    let fixtures = fixture("");
    let run = compare_long(
        &dir,
        &[
            "--ready",
            "notify",
            "--stop-signal",
            "SIGTERM",
            "--scenarios",
            "uniform",
            "--duration",
            "500ms",
            // A quarter of the run (the default) is a bound a loaded CI machine
            // can stall past; errors here are to mean a lost request, not a slow one.
            "--timeout",
            "5s",
            "--",
            &gunicorn,
            "--chdir",
            &fixtures,
            "--workers",
            "1",
            // Two arbiters would share gunicorn's default control socket path.
            "--no-control-socket",
            "gunicorn_app:app",
        ],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let rows = table_rows(&run.stdout);
    let modes: Vec<&str> = rows.keys().map(|(_, mode)| mode.as_str()).collect();
    assert_eq!(modes.len(), 3, "{}", run.stdout);
    for mode in ["shared", "reuseport", "kernel"] {
        let cells = &rows
            .get(&("uniform".to_string(), mode.to_string()))
            .unwrap_or_else(|| panic!("no {mode} row, by default, in\n{}", run.stdout));
        let measured = cells[REQUESTS].parse::<u64>().is_ok_and(|n| n > 0);
        if mode == "kernel" {
            assert!(
                measured || cells.len() > MEASURED_CELLS,
                "{mode}: {cells:?}"
            );
            continue;
        }
        assert!(measured, "{mode}: {cells:?}");
        assert_eq!(cells[ERRORS], "0", "{mode}: {cells:?}");
        let spread_from = cells[SPREAD_FROM].as_str();
        assert!(["-", "herd"].contains(&spread_from), "{mode}: {cells:?}");
        if spread_from == "-" {
            assert_eq!(cells[MAX_MIN], "-", "{mode}: {cells:?}");
            assert!(cells.join(" ").contains("no spread"), "{mode}: {cells:?}");
        }
    }
    let shared = &rows[&("uniform".to_string(), "shared".to_string())];
    assert_eq!(
        shared[SPREAD_FROM], "-",
        "nobody counts gunicorn in shared: {shared:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A fixed `--listen` port, bound by one herd after the other (each stopped
/// before the next starts), and the worker command from `--config`, whose
/// fixed metrics port compare replaces with a free one per run.
#[test]
fn a_fixed_listen_address_and_a_config_file_serve_every_run() {
    let dir = scratch_dir("compare-fixed-listen");
    let free_port = || {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let (port, metrics) = (free_port(), free_port());
    let config = dir.join("herd.toml");
    std::fs::write(
        &config,
        format!(
            "command = [{:?}]\nshutdown_timeout = \"5s\"\n[metrics]\naddress = \"127.0.0.1:{metrics}\"\n",
            hello_worker()
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{port}");
    let config_arg = config.display().to_string();
    let run = compare_long(
        &dir,
        &[
            "--modes",
            "round-robin,reuseport,shared",
            "--scenarios",
            "connect",
            "--duration",
            "300ms",
            // See above: a slow request on a busy machine is not an error here.
            "--timeout",
            "5s",
            "--listen",
            &listen,
            "--config",
            &config_arg,
        ],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let rows = table_rows(&run.stdout);
    assert_eq!(rows.len(), 3, "{}", run.stdout);
    for ((_, mode), cells) in &rows {
        assert!(
            cells[REQUESTS].parse::<u64>().is_ok_and(|n| n > 0),
            "{mode}: {cells:?}"
        );
        assert_eq!(cells[ERRORS], "0", "{mode}: {cells:?}");
        assert_eq!(cells.len(), MEASURED_CELLS, "{mode}: no note: {cells:?}");
    }
    assert!(
        run.stdout.contains(&format!("of `{}`", hello_worker())),
        "the file's command: {}",
        run.stdout
    );
    let _ = std::fs::remove_dir_all(dir);
}
