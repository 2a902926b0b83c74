//! `herd compare` as a process: real herds with real hello-workers, one per
//! mode and scenario, short runs; the table, the files it writes, and its
//! answers to bad arguments and to modes that do not start.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;

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
