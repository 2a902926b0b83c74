//! What a comparison's rows look like to people and spreadsheets: the
//! aligned text table, `compare.md`, `compare.csv` (raw units), the command
//! line that produced them, and [`write_files`], which writes those and the
//! SVG chart.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::svg::render_svg;
use super::{CompareError, CompareReport, Row, Scenario};
use crate::bench;

/// The table's columns, for text and Markdown.
const COLUMNS: &[&str] = &[
    "scenario",
    "mode",
    "requests",
    "req/s",
    "conn/s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "errors",
    "timeouts",
    "max/min",
    "Jain",
    "spread from",
    "RSS MiB",
    "herd CPU µs/conn",
    "note",
];

/// Columns whose cells are words, left-aligned; the others are numbers.
fn is_text_column(index: usize) -> bool {
    matches!(COLUMNS[index], "scenario" | "mode" | "spread from" | "note")
}

/// The human-readable cells of one row, in [`COLUMNS`] order.
fn cells(row: &Row) -> Vec<String> {
    let dash = || "-".to_string();
    let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
    let note = row.note.clone().unwrap_or_default();
    let Some(bench) = &row.bench else {
        let mut cells = vec![row.scenario.name().to_string(), row.mode.clone()];
        cells.extend((2..COLUMNS.len() - 1).map(|_| dash()));
        cells.push(note);
        return cells;
    };
    let latency = |pick: fn(&bench::Latency) -> u64| {
        bench.latency.as_ref().map_or_else(dash, |l| ms(pick(l)))
    };
    vec![
        row.scenario.name().to_string(),
        row.mode.clone(),
        bench.requests.to_string(),
        format!("{:.0}", bench.requests_per_sec),
        format!("{:.0}", bench.connections_per_sec),
        latency(|l| l.p50_us),
        latency(|l| l.p99_us),
        latency(|l| l.max_us),
        bench.errors.to_string(),
        row.timeouts().unwrap_or(0).to_string(),
        row.fairness
            .and_then(|f| f.max_min_ratio)
            .map_or_else(dash, |r| format!("{r:.2}")),
        row.fairness
            .map_or_else(dash, |f| format!("{:.3}", f.jain_index)),
        row.spread_from.map_or_else(dash, |s| s.name().to_string()),
        row.primary_rss_bytes
            .map_or_else(dash, |b| format!("{:.1}", b as f64 / 1_048_576.0)),
        row.primary_cpu_us_per_connection
            .map_or_else(dash, |us| format!("{us:.1}")),
        note,
    ]
}

/// The side-by-side table for a terminal: aligned columns, one row per
/// scenario and mode, a blank line between scenarios.
pub fn render_table(report: &CompareReport) -> String {
    let rows: Vec<Vec<String>> = report.rows.iter().map(cells).collect();
    let mut widths: Vec<usize> = COLUMNS.iter().map(|c| c.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let last = i == cells.len() - 1;
            let pad = widths[i].saturating_sub(cell.chars().count());
            if last {
                out.push_str(cell);
            } else if is_text_column(i) {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            } else {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
                out.push_str("  ");
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let header: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
    let mut out = line(&header);
    let mut previous: Option<Scenario> = None;
    for (row, cells) in report.rows.iter().zip(&rows) {
        if previous.is_some_and(|p| p != row.scenario) {
            out.push('\n');
        }
        previous = Some(row.scenario);
        out.push_str(&line(cells));
    }
    out
}

/// `compare.md`: the command that produced it, the load, the scenarios and
/// the table.
pub fn render_markdown(report: &CompareReport, invocation: &str) -> String {
    let mut out = String::from("# herd compare\n\n");
    let _ = writeln!(out, "```\n{invocation}\n```\n");
    let _ = writeln!(out, "Each run: {}.\n", report.summary());
    for scenario in &report.scenarios {
        let _ = writeln!(out, "- `{}`: {}.", scenario.name(), scenario.describe());
    }
    out.push('\n');
    let escape = |cell: &str| cell.replace('|', "\\|");
    let _ = writeln!(out, "| {} |", COLUMNS.join(" | "));
    let rule: Vec<&str> = (0..COLUMNS.len())
        .map(|i| if is_text_column(i) { "---" } else { "--:" })
        .collect();
    let _ = writeln!(out, "|{}|", rule.join("|"));
    for row in &report.rows {
        let cells: Vec<String> = cells(row).iter().map(|c| escape(c)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out.push_str(
        "\nLatency is of successful requests, from writing the request to the full \
         response. Errors include timeouts. max/min and Jain's index are over every \
         worker herd had when the load began: of the answers per worker when the \
         bodies name it (spread from `bodies`), else of the connections herd counted \
         per slot during the load (`herd`). RSS is herd's primary after the load; herd CPU is the primary's CPU time during the load per connection opened (10 ms ticks).\n",
    );
    out
}

/// The CSV header: raw units (microseconds, bytes), for spreadsheets.
pub const CSV_HEADER: &str = "scenario,mode,requests,succeeded,errors,timeouts,\
requests_per_sec,connections_per_sec,p50_us,p99_us,max_us,max_min_ratio,jain_index,\
spread_from,primary_rss_bytes,primary_cpu_us_per_connection,note";

/// `compare.csv`: one line per row, empty fields where nothing was measured.
pub fn render_csv(report: &CompareReport) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for row in &report.rows {
        let opt = |v: Option<String>| v.unwrap_or_default();
        let bench = row.bench.as_ref();
        let latency = bench.and_then(|b| b.latency);
        let fields = [
            row.scenario.name().to_string(),
            row.mode.clone(),
            opt(bench.map(|b| b.requests.to_string())),
            opt(bench.map(|b| b.succeeded.to_string())),
            opt(bench.map(|b| b.errors.to_string())),
            opt(row.timeouts().map(|n| n.to_string())),
            opt(bench.map(|b| format!("{:.1}", b.requests_per_sec))),
            opt(bench.map(|b| format!("{:.1}", b.connections_per_sec))),
            opt(latency.map(|l| l.p50_us.to_string())),
            opt(latency.map(|l| l.p99_us.to_string())),
            opt(latency.map(|l| l.max_us.to_string())),
            opt(row
                .fairness
                .and_then(|f| f.max_min_ratio)
                .map(|r| format!("{r:.3}"))),
            opt(row.fairness.map(|f| format!("{:.4}", f.jain_index))),
            opt(row.spread_from.map(|s| s.name().to_string())),
            opt(row.primary_rss_bytes.map(|b| b.to_string())),
            opt(row
                .primary_cpu_us_per_connection
                .map(|us| format!("{us:.2}"))),
            row.note.clone().unwrap_or_default(),
        ];
        let fields: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// Quotes a CSV field when it holds a comma, quote or line break (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// The command line as one shell-pasteable string (arguments with spaces or
/// shell characters are single-quoted).
pub fn command_line(args: &[String]) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=,@%+".contains(c);
    args.iter()
        .map(|a| {
            if !a.is_empty() && a.chars().all(plain) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `compare.md`, `compare.csv` and `compare.svg` into `dir` (created
/// if missing); returns their paths.
pub fn write_files(
    report: &CompareReport,
    dir: &Path,
    invocation: &str,
) -> Result<Vec<PathBuf>, CompareError> {
    std::fs::create_dir_all(dir).map_err(|source| CompareError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let files = [
        ("compare.md", render_markdown(report, invocation)),
        ("compare.csv", render_csv(report)),
        ("compare.svg", render_svg(report)),
    ];
    let mut written = Vec::new();
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| CompareError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::sample::report;

    #[test]
    fn table_has_a_row_per_scenario_and_mode() {
        let text = render_table(&report());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("scenario") && lines[0].contains("p99 ms"));
        assert!(lines[1].starts_with("uniform   round-robin"), "{text}");
        assert!(
            lines[1].contains("1.50") && lines[1].contains("0.962") && lines[1].contains(" herd "),
            "{text}"
        );
        assert!(lines[2].contains("invalid `mode`"), "{text}");
        assert_eq!(lines[3], "", "a blank line between scenarios: {text}");
        assert!(
            lines[4].contains("250.00") && lines[4].contains(" 7 "),
            "{text}"
        );
        assert!(lines[5].ends_with("no such mode"), "{text}");
        // Numbers line up on the right edge of their column.
        let p99 = |line: &str| line.find("p99 ms").map(|i| i + "p99 ms".len());
        let end = p99(lines[0]).unwrap();
        assert_eq!(&lines[1][end - 4..end], "1.50", "{text}");
    }

    #[test]
    fn markdown_has_the_command_and_an_escaped_table() {
        let md = render_markdown(&report(), "herd compare -- worker");
        assert!(md.contains("```\nherd compare -- worker\n```"));
        assert!(md.contains("- `stalled`: "));
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(rows.len(), 2 + 4, "{md}");
        let columns = |l: &str| l.replace("\\|", "").matches('|').count();
        assert!(rows.iter().all(|r| columns(r) == COLUMNS.len() + 1), "{md}");
        assert!(rows[3].contains("\\| bad"), "{md}");
    }

    #[test]
    fn csv_quotes_notes_and_leaves_gaps_empty() {
        let csv = render_csv(&report());
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines.len(), 5);
        assert!(lines[1].starts_with(
            "uniform,round-robin,1000,1000,0,0,1000.0,4.0,400,1500,3000,1.500,0.9615,herd,8388608,12.50,"
        ));
        assert!(
            lines[2].starts_with("uniform,shared,,,,,,,,,,,,,,,\"herd exited"),
            "{csv}"
        );
        assert!(lines[2].contains("\"\"shared\"\""), "{csv}");
        assert!(
            lines[3].starts_with("stalled,round-robin,500,493,7,7,"),
            "{csv}"
        );
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("plain"), "plain");
    }

    #[test]
    fn command_lines_quote_what_a_shell_would_split() {
        let args: Vec<String> = [
            "herd",
            "compare",
            "--modes",
            "a,b",
            "--",
            "w",
            "two words",
            "it's",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            command_line(&args),
            "herd compare --modes a,b -- w 'two words' 'it'\\''s'"
        );
        assert_eq!(command_line(&["".to_string()]), "''");
    }
}
