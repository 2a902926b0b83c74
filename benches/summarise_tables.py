#!/usr/bin/env python3
"""Summarise a benches/ceiling.sh or benches/scale.sh run as one Markdown table
(standard library only).

    summarise_tables.py ceiling OUT   # rows: hand-off thread counts
    summarise_tables.py scale OUT     # rows: setups, columns: worker counts

Both read OUT/index.tsv (one row per round and run, written by the script),
the JSON reports it names (connect_storm's one line, or `herd bench --json`)
and OUT/env.txt, and print the median over the rounds of each figure. Runs
that failed, or whose load counted errors, are listed under the table.
"""

import csv
import json
import os
import statistics
import sys


def env(out):
    """OUT/env.txt as a dict."""
    values = {}
    with open(os.path.join(out, "env.txt")) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("=")
            values[key] = value
    return values


def rows(out):
    with open(os.path.join(out, "index.tsv")) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def reports(out, names):
    """The JSON reports of one run, None for one that is empty or cut:
    `herd bench --json` prints one document over many lines, connect_storm
    one line (after a `holding` line in --hold, so its last line counts)."""
    found = []
    for name in filter(None, names.split(",")):
        with open(os.path.join(out, name)) as f:
            text = f.read()
        try:
            found.append(json.loads(text))
            continue
        except json.JSONDecodeError:
            pass
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            found.append(json.loads(lines[-1]) if lines else None)
        except json.JSONDecodeError:
            found.append(None)
    return found


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=0, suffix=""):
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def ceiling(out):
    meta = env(out)
    clk = float(meta.get("clk_tck", "100"))
    by_variant = {}
    problems = []
    for row in rows(out):
        name = row["variant"]
        by_variant.setdefault(name, [])
        if row["status"] != "ok":
            problems.append(f"round {row['round']}, {name}: {row['status']}")
            continue
        loads = reports(out, row["json"])
        if any(r is None for r in loads):
            problems.append(f"round {row['round']}, {name}: a loader printed nothing")
            continue
        conns = sum(r["connections"] for r in loads)
        rate = sum(r["conn_per_sec"] for r in loads)
        errors = sum(r["errors"] + r["timeouts"] for r in loads)
        if errors:
            first = next((r["first_error"] for r in loads if r["first_error"]), "timeouts")
            problems.append(f"round {row['round']}, {name}: {errors} errors or timeouts ({first})")
        wall = float(row["wall_s"])
        threads = [int(p.split(":")[1]) for p in row["handoff_ticks"].split(",") if p]
        handoff = sum(threads)
        busiest = max(threads) if threads else 0
        util = busiest / clk / wall if threads else None
        per_conn = lambda ticks: ticks / clk / conns * 1e6 if conns else None
        by_variant[name].append(
            {
                "rate": rate,
                "errors": errors,
                "herd_us": per_conn(int(row["herd_ticks"])),
                "handoff_us": per_conn(handoff) if threads else None,
                "util": util,
                # Where the busiest thread's utilisation reaches 1: rate / util,
                # counted over the same window as its CPU time.
                "saturates": conns / (busiest / clk) if busiest else None,
                "threads": len(threads),
                "front": 100.0 * int(row["front_busy"]) / max(1, int(row["front_total"])),
                "load": 100.0 * int(row["load_busy"]) / max(1, int(row["load_total"])),
            }
        )
    print(f"herd's hand-off ceiling ({meta.get('date', '?')}; {meta.get('cpus', '?')}; "
          f"herd {meta.get('herd_commit', '?')})")
    print()
    print(f"```sh\n{meta.get('command', '?')}\n```")
    print()
    head = ["hand-off threads", "rounds", "conn/s", "errors", "herd CPU µs/conn",
            "hand-off thread µs/conn", "hand-off util (busiest)", "saturates at conn/s",
            "front CPUs busy", "load CPUs busy"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "--:|" * (len(head) - 1))
    for name, runs in by_variant.items():
        label = name.split("=", 1)[1] if "=" in name else "1 (no flag)"
        pick = lambda key: median([r[key] for r in runs])
        util = pick("util")
        print("| " + " | ".join([
            label,
            str(len(runs)),
            fmt(pick("rate")),
            fmt(pick("errors")),
            fmt(pick("herd_us"), 2),
            fmt(pick("handoff_us"), 2),
            fmt(util * 100 if util is not None else None, 0, " %"),
            fmt(pick("saturates")),
            fmt(pick("front"), 0, " %"),
            fmt(pick("load"), 0, " %"),
        ]) + " |")
    print()
    if meta.get("handoff_threads_flag") == "no":
        print("This herd has no `--handoff-threads` flag: one hand-off thread, one run per round.")
    print("Medians over the rounds. CPU from /proc at the kernel's tick "
          f"(1/{clk:.0f} s); `saturates at` = conn/s ÷ the busiest hand-off thread's "
          "utilisation over the load (= the connections ÷ its CPU seconds).")
    for p in problems:
        print(f"- {p}")


def scale(out):
    meta = env(out)
    counts = meta.get("worker_counts", "").split()
    setups = meta.get("setups", "").split()
    shapes = meta.get("shapes", "close").split()
    cells = {}
    problems = []
    notes = {}
    skipped = set()
    for row in rows(out):
        key = (row["shape"], row["setup"], row["workers"])
        cells.setdefault(key, [])
        if row["status"] != "ok":
            problems.append(f"round {row['round']}, {row['setup']}, {row['workers']} workers: {row['status']}")
            if row["status"].startswith("skipped"):
                notes[row["setup"]] = row["status"]
                skipped.add(key)
            continue
        loads = reports(out, row["json"])
        if any(r is None for r in loads):
            problems.append(f"round {row['round']}, {row['setup']}, {row['workers']}: a loader printed nothing")
            continue
        if row["shape"] == "close":
            rate = sum(r["connections_per_sec"] for r in loads)
        else:
            rate = sum(r["requests_per_sec"] for r in loads)
        errors = sum(r["errors"] for r in loads)
        if errors:
            problems.append(f"round {row['round']}, {row['setup']}, {row['workers']} workers, "
                            f"{row['shape']}: {errors} errors")
        cells[key].append(rate)
    print(f"Connection rate against the number of workers ({meta.get('date', '?')}; "
          f"{meta.get('cpus', '?')}; herd {meta.get('herd_commit', '?')})")
    print()
    print(f"```sh\n{meta.get('command', '?')}\n```")
    for shape in shapes:
        unit = "conn/s, a new connection per request" if shape == "close" else "req/s, keep-alive"
        print()
        print(f"{unit}, {meta.get('clients', '?')} clients per loader, median of "
              f"{meta.get('rounds', '?')} rounds:")
        print()
        print("| setup | " + " | ".join(f"{c} workers" for c in counts) + " |")
        print("|---|" + "--:|" * len(counts))
        for setup in setups:
            line = []
            for c in counts:
                values = cells.get((shape, setup, c))
                if values is None:
                    line.append("-")
                elif not values:
                    line.append("skipped" if (shape, setup, c) in skipped else "failed")
                else:
                    line.append(fmt(median(values)))
            print(f"| {setup} | " + " | ".join(line) + " |")
    print()
    for setup, note in notes.items():
        print(f"- {setup}: {note}")
    seen = set()
    for p in problems:
        if p not in seen and not p.split(": ", 1)[-1].startswith("skipped"):
            print(f"- {p}")
        seen.add(p)


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("ceiling", "scale"):
        sys.exit("usage: summarise_tables.py ceiling|scale OUT")
    {"ceiling": ceiling, "scale": scale}[sys.argv[1]](sys.argv[2])


if __name__ == "__main__":
    main()
