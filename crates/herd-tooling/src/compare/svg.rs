//! `compare.svg`: two grouped bar charts, requests/s and p99 latency, a
//! group per scenario and a bar per mode, written as plain SVG text.

use std::fmt::Write as _;

use super::{CompareReport, Row, Scenario};

/// Bar colours, one per mode in order (repeating past seven).
const PALETTE: &[&str] = &[
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
];

/// `compare.svg`: two grouped bar charts, requests/s and p99 latency, with a
/// group per scenario and a bar per mode. Plain SVG text, no dependencies.
pub fn render_svg(report: &CompareReport) -> String {
    const WIDTH: f64 = 760.0;
    const PANEL: f64 = 250.0;
    const LEGEND: f64 = 40.0;
    let height = 2.0 * PANEL + LEGEND;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (index, panel) in PANELS.iter().enumerate() {
        bar_panel(&mut svg, report, panel, index as f64 * PANEL, WIDTH, PANEL);
    }
    // Legend: one swatch per mode.
    let mut x = 60.0;
    let y = 2.0 * PANEL + 15.0;
    for (i, mode) in report.modes.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<rect x=\"{x}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            PALETTE[i % PALETTE.len()],
            x + 16.0,
            y + 10.5,
            xml_escape(mode)
        );
        x += 30.0 + 7.0 * mode.chars().count() as f64;
    }
    svg.push_str("</svg>\n");
    svg
}

/// One bar chart of the SVG: which number of a row, and how to print it.
struct Panel {
    title: &'static str,
    value: fn(&Row) -> Option<f64>,
    label: fn(f64) -> String,
}

const PANELS: [Panel; 2] = [
    Panel {
        title: "requests/s (higher is better)",
        value: |row| row.bench.as_ref().map(|b| b.requests_per_sec),
        label: |v| format!("{v:.0}"),
    },
    Panel {
        title: "p99 latency, ms (lower is better)",
        value: |row| {
            row.bench
                .as_ref()
                .and_then(|b| b.latency)
                .map(|l| l.p99_us as f64 / 1000.0)
        },
        label: |v| format!("{v:.2}"),
    },
];

/// Where one panel's plot lies, in SVG units: its axes run along the left
/// and bottom edges.
#[derive(Clone, Copy)]
struct Plot {
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
}

/// One bar's place in a panel, and whose number it shows.
struct Bar<'a> {
    x: f64,
    width: f64,
    colour: &'static str,
    scenario: Scenario,
    mode: &'a str,
}

/// One grouped bar chart at vertical offset `top`.
fn bar_panel(
    svg: &mut String,
    report: &CompareReport,
    panel: &Panel,
    top: f64,
    width: f64,
    height: f64,
) {
    let plot = Plot {
        left: 60.0,
        right: width - 20.0,
        top: top + 40.0,
        bottom: top + height - 30.0,
    };
    let max = report
        .rows
        .iter()
        .filter_map(panel.value)
        .fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { max } else { 1.0 };
    title_and_axes(svg, panel, plot, top + 22.0, max);
    let groups = report.scenarios.len().max(1) as f64;
    let bars = report.modes.len().max(1) as f64;
    let group_width = (plot.right - plot.left) / groups;
    let bar_width = group_width * 0.8 / bars;
    for (g, scenario) in report.scenarios.iter().enumerate() {
        let group_left = plot.left + g as f64 * group_width + group_width * 0.1;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            group_left + group_width * 0.4,
            plot.bottom + 18.0,
            scenario.name()
        );
        for (b, mode) in report.modes.iter().enumerate() {
            let row = report
                .rows
                .iter()
                .find(|r| r.scenario == *scenario && &r.mode == mode);
            let bar = Bar {
                x: group_left + b as f64 * bar_width,
                width: bar_width,
                colour: PALETTE[b % PALETTE.len()],
                scenario: *scenario,
                mode,
            };
            draw_bar(svg, panel, plot, &bar, row.and_then(panel.value), scale);
        }
    }
}

/// A panel's title, its two axes, and the top and bottom of its scale.
fn title_and_axes(svg: &mut String, panel: &Panel, plot: Plot, title_y: f64, max: f64) {
    let Plot {
        left,
        right,
        top: plot_top,
        bottom: plot_bottom,
    } = plot;
    let _ = writeln!(
        svg,
        "<text x=\"{left}\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        title_y,
        xml_escape(panel.title)
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{plot_top}\" x2=\"{left}\" y2=\"{plot_bottom}\" stroke=\"#444\"/>\
         <line x1=\"{left}\" y1=\"{plot_bottom}\" x2=\"{right}\" y2=\"{plot_bottom}\" stroke=\"#444\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
         <text x=\"{}\" y=\"{plot_bottom}\" text-anchor=\"end\">0</text>",
        left - 4.0,
        plot_top + 4.0,
        xml_escape(&(panel.label)(max)),
        left - 4.0,
    );
}

/// One bar, `value` high on a scale whose top is `scale`, labelled; `n/a`
/// where the row has no such number.
fn draw_bar(
    svg: &mut String,
    panel: &Panel,
    plot: Plot,
    bar: &Bar<'_>,
    value: Option<f64>,
    scale: f64,
) {
    let Bar { x, width, .. } = *bar;
    let center = x + width / 2.0;
    let Some(v) = value else {
        let _ = writeln!(
            svg,
            "<text x=\"{center:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\" \
             fill=\"#888\">n/a</text>",
            plot.bottom - 3.0
        );
        return;
    };
    let h = (v / scale) * (plot.bottom - plot.top);
    let label = (panel.label)(v);
    let _ = writeln!(
        svg,
        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\">\
         <title>{} {}: {}</title></rect>\
         <text x=\"{center:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>",
        plot.bottom - h,
        (width - 2.0).max(1.0),
        bar.colour,
        bar.scenario.name(),
        xml_escape(bar.mode),
        xml_escape(&label),
        plot.bottom - h - 3.0,
        xml_escape(&label),
    );
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::sample::report;

    #[test]
    fn svg_is_one_element_with_a_bar_per_measurement() {
        let svg = render_svg(&report());
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        // Two panels × two measured rows; the failed rows show n/a.
        assert_eq!(svg.matches("<title>").count(), 4, "{svg}");
        assert_eq!(svg.matches(">n/a<").count(), 4, "{svg}");
        assert!(svg.contains(">round-robin</text>") && svg.contains(">shared</text>"));
        // Balanced tags.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert_eq!(
            svg.matches("<title>").count(),
            svg.matches("</title>").count()
        );
        assert_eq!(
            svg.matches("<rect").count(),
            svg.matches("</rect>").count() + svg.matches("\"/>").count()
                - svg.matches("<line").count()
        );
        assert_eq!(xml_escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }
}
