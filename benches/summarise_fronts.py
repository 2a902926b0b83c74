#!/usr/bin/env python3
"""Summarise a benches/fronts.sh run as Markdown tables (standard library only).

Reads OUT/index.tsv (one row per round x setup x load shape), the `herd bench
--json` reports it points to and OUT/env.txt, and prints, per setup and
shape, the median over rounds of:

- the rate: connections/s for new-connection-per-request shapes, requests/s
  for keep-alive shapes, and its ratio to the baseline setup (`direct`);
- latency p50 / p99 and what the setup adds to the baseline's;
- fairness over the workers: max/min and Jain's index, from the per-worker
  answer counts, padded with zeros up to the number of workers the setup runs
  (a worker that got nothing counts, so one busy worker out of two is max/min
  infinite and Jain 0.5, not 1.0);
- CPU time per request, from /proc/PID/stat before and after each load:
  of every process of the setup, and of the front alone (the load generator
  is not counted);
- the resident memory of the front's primary process (herd's primary, Node's
  primary, haproxy; for `direct` the worker itself) and of every process of
  the setup, read right after each load; the median over rounds of each
  round's largest reading.

Setups that never started, and runs with request errors, are listed under
the tables. With --spread, a last table gives the lowest and highest rate of
the rounds behind each median.
"""

import argparse
import csv
import json
import math
import os
import statistics
import sys

SHAPES = ["close-1", "close-50", "keepalive-1", "keepalive-50"]
SHAPE_TITLE = {
    "close-1": "new conn/request, 1 conn",
    "close-50": "new conn/request, 50 conns",
    "keepalive-1": "keep-alive, 1 conn",
    "keepalive-50": "keep-alive, 50 conns",
}


def start_table(lines, title, head):
    """Appends a table's title, a blank line, its header and the rule under it."""
    lines.append(title)
    lines.append("")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))


def failed_row_line(setup, cells):
    """A table row for a setup that never started: `failed` in every cell."""
    return f"| {setup} | " + " | ".join(["failed"] * cells) + " |"


def load(out):
    """Rows of index.tsv, each with its report (None when it failed)."""
    rows = []
    with open(os.path.join(out, "index.tsv"), newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            row["report"] = None
            if row["status"] == "ok":
                try:
                    with open(os.path.join(out, row["json"])) as j:
                        row["report"] = json.load(j)
                except (OSError, ValueError) as e:
                    row["status"] = f"failed: unreadable report ({e})"
            rows.append(row)
    return rows


def load_env(out):
    env = {}
    try:
        with open(os.path.join(out, "env.txt")) as f:
            for line in f:
                key, _, value = line.rstrip("\n").partition("=")
                env[key] = value
    except OSError:
        pass
    return env


def rate(report, shape):
    key = "connections_per_sec" if shape.startswith("close") else "requests_per_sec"
    return report[key]


def fairness(report, expected):
    """(max/min, Jain) over `expected` workers, counting unseen ones as 0."""
    counts = [w["count"] for w in report.get("workers", [])]
    counts += [0] * max(0, expected - len(counts))
    total = sum(counts)
    if not counts or total == 0:
        return None
    low, high = min(counts), max(counts)
    ratio = math.inf if low == 0 else high / low
    jain = total * total / (len(counts) * sum(c * c for c in counts))
    return ratio, jain


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt_num(v, digits=0):
    if v is None:
        return "—"
    if math.isinf(v):
        return "∞"
    return f"{v:.{digits}f}"


def fmt_delta(v):
    if v is None:
        return "—"
    return f"{v:+.0f}"


def cpu_us_per_request(row, column, clk_tck):
    """CPU µs per successful request of one run, from a *_cpu_ticks column."""
    ticks = row.get(column) or ""
    done = row["report"]["succeeded"]
    if not ticks or not done:
        return None
    return int(ticks) / clk_tck * 1e6 / done


def summarise(rows, env, baseline, spread=False):
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    ok = {}  # (setup, shape) -> list of rows that produced a report
    failures = {}  # setup -> list of (round, reason)
    rss = {}  # setup -> round -> [(front, total)]
    for r in rows:
        if r["report"] is not None:
            ok.setdefault((r["setup"], r["shape"]), []).append(r)
        else:
            failures.setdefault(r["setup"], []).append((r["round"], r["shape"], r["status"]))
        if r["front_rss_kib"]:
            rss.setdefault(r["setup"], {}).setdefault(r["round"], []).append(
                (int(r["front_rss_kib"]), int(r["total_rss_kib"]))
            )

    def med(setup, shape, f):
        return median([f(r) for r in ok.get((setup, shape), [])])

    def med_rate(setup, shape):
        return med(setup, shape, lambda r: rate(r["report"], shape))

    def med_lat(setup, shape, key):
        return med(setup, shape, lambda r: (r["report"]["latency"] or {}).get(key))

    lines = []
    rounds = env.get("rounds") or str(len({r["round"] for r in rows}))
    lines.append(f"Run {env.get('date', '?')}: `{env.get('command', '?')}`  ")
    lines.append(
        f"Machine: {env.get('cpus', '?')}, Linux {env.get('kernel', '?')}; "
        f"the load generator (`herd bench`, one thread) shares the cores with the setup under test.  "
    )
    lines.append(
        f"herd {env.get('herd_commit', '?')}, Node {env.get('node', '?')} "
        f"({env.get('node_workers', '?')} cluster workers), HAProxy {env.get('haproxy', '?')} "
        f"(nbthread {env.get('haproxy_nbthread', '?')}); {env.get('workers', '?')} hello-worker(s) behind herd and HAProxy; "
        f"{env.get('duration', '?')} per run, {rounds} interleaved rounds, medians; "
        f"clients from {env.get('source_range', '127.0.0.1 only')}; "
        f"load average {env.get('load_at_start', '?')} at start, {env.get('load_at_end', '?')} at end."
    )
    lines.append("")

    def failed_row(setup):
        return setup not in {s for (s, _) in ok}

    # Throughput.
    lines.append(f"Rates, median (ratio to `{baseline}`); memory in KiB right after the load:")
    lines.append("")
    head = ["setup"] + [
        SHAPE_TITLE[s] + (" (conn/s)" if s.startswith("close") else " (req/s)") for s in SHAPES
    ] + ["front's primary RSS", "all processes RSS"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for setup in setups:
        if failed_row(setup):
            lines.append(f"| {setup} | " + " | ".join(["failed"] * (len(head) - 1)) + " |")
            continue
        cells = [setup]
        for shape in SHAPES:
            v, base = med_rate(setup, shape), med_rate(baseline, shape)
            ratio = f" ({v / base:.2f})" if v is not None and base else ""
            cells.append(fmt_num(v) + ratio)
        per_round = rss.get(setup, {}).values()
        cells.append(fmt_num(median([max(f for f, _ in samples) for samples in per_round])))
        cells.append(fmt_num(median([max(t for _, t in samples) for samples in per_round])))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    # Latency.
    head = ["setup"] + [SHAPE_TITLE[s] for s in SHAPES]
    start_table(lines, f"Latency p50 / p99 in µs, median (added vs `{baseline}`):", head)
    for setup in setups:
        if failed_row(setup):
            lines.append(failed_row_line(setup, len(SHAPES)))
            continue
        cells = [setup]
        for shape in SHAPES:
            p50, p99 = med_lat(setup, shape, "p50_us"), med_lat(setup, shape, "p99_us")
            b50, b99 = med_lat(baseline, shape, "p50_us"), med_lat(baseline, shape, "p99_us")
            cell = f"{fmt_num(p50)} / {fmt_num(p99)}"
            if setup != baseline and None not in (p50, p99, b50, b99):
                cell += f" ({fmt_delta(p50 - b50)} / {fmt_delta(p99 - b99)})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    # Fairness. One keep-alive connection can only ever reach one worker, so
    # that shape says nothing about the spread and is left out.
    fair_shapes = ["close-1", "close-50", "keepalive-50"]
    head = ["setup", "workers"] + [SHAPE_TITLE[s] for s in fair_shapes]
    start_table(lines, "Spread over workers, median max/min and Jain's index (1 = even, 1/n = all on one):", head)
    for setup in setups:
        if failed_row(setup):
            lines.append(f"| {setup} | " + " | ".join(["failed"] * (len(head) - 1)) + " |")
            continue
        expected = median([int(r["workers_expected"]) for s in SHAPES for r in ok.get((setup, s), [])])
        cells = [setup, fmt_num(expected)]
        for shape in fair_shapes:
            spreads = [fairness(r["report"], int(r["workers_expected"])) for r in ok.get((setup, shape), [])]
            spreads = [s for s in spreads if s]
            if not spreads:
                cells.append("—")
                continue
            ratio = median([s[0] for s in spreads])
            jain = median([s[1] for s in spreads])
            cells.append(f"{fmt_num(ratio, 2)}, {jain:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    # CPU cost.
    clk_tck = int(env.get("clk_tck") or 100)
    lines.append(
        "CPU per request in µs, median: every process of the setup (the front's primary alone); "
        f"the kernel counts CPU time in ticks of {1e3 / clk_tck:g} ms per process:"
    )
    lines.append("")
    head = ["setup"] + [SHAPE_TITLE[s] for s in SHAPES]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for setup in setups:
        if failed_row(setup):
            lines.append(failed_row_line(setup, len(SHAPES)))
            continue
        cells = [setup]
        for shape in SHAPES:
            total = med(setup, shape, lambda r: cpu_us_per_request(r, "total_cpu_ticks", clk_tck))
            front = med(setup, shape, lambda r: cpu_us_per_request(r, "front_cpu_ticks", clk_tck))
            cell = fmt_num(total, 1)
            if setup != baseline:
                cell += f" ({fmt_num(front, 1)})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    if spread:
        lines.append("Spread of the rates over the rounds, lowest – highest:")
        lines.append("")
        head = ["setup"] + [SHAPE_TITLE[s] for s in SHAPES]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for setup in setups:
            if failed_row(setup):
                continue
            cells = [setup]
            for shape in SHAPES:
                rates = [rate(r["report"], shape) for r in ok.get((setup, shape), [])]
                cells.append(f"{min(rates):.0f} – {max(rates):.0f}" if rates else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    # What did not work.
    notes = []
    for setup, items in failures.items():
        reasons = sorted({reason for _, _, reason in items})
        n_rounds = len({rnd for rnd, _, _ in items})
        notes.append(f"- **{setup}**: failed in {n_rounds} of {rounds} rounds: {'; '.join(reasons)}")
    for (setup, shape), rs in ok.items():
        errors = sum(r["report"]["errors"] for r in rs)
        if errors:
            kinds = {}
            for r in rs:
                for kind, n in r["report"].get("errors_by_kind", {}).items():
                    kinds[kind] = kinds.get(kind, 0) + n
            detail = ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items()))
            total = sum(r["report"]["requests"] for r in rs)
            notes.append(f"- {setup}, {SHAPE_TITLE[shape]}: {errors} of {total} requests failed ({detail})")
    if notes:
        lines.append("Failures and errors:")
        lines.append("")
        lines.extend(notes)
    else:
        lines.append("No setup failed and no request failed.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Example: python3 benches/summarise_fronts.py /tmp/herd-fronts.abc123",
    )
    parser.add_argument("out", help="the OUT directory of a benches/fronts.sh run")
    parser.add_argument("--spread", action="store_true", help="also print the lowest and highest rate of the rounds")
    parser.add_argument(
        "--baseline", default="direct", help="setup the ratios and added latency are relative to (default: direct)"
    )
    args = parser.parse_args()
    try:
        rows = load(args.out)
    except OSError as e:
        sys.exit(f"summarise_fronts: {e}")
    if not rows:
        sys.exit("summarise_fronts: index.tsv has no runs")
    print(summarise(rows, load_env(args.out), args.baseline, args.spread))


if __name__ == "__main__":
    main()
