#!/usr/bin/env bash
# herd primary's resident memory: with 1, 64 and 512 workers, and with
# 10,000 open client connections waiting in its wait queue.
#
# For each count N of $WORKER_COUNTS, herd runs round-robin with hand-offs
# (`--rotation handoff`) in front of N target/release/hello-worker, and the
# primary's VmRSS and VmHWM (/proc/PID/status, herd's pid only, not its
# workers) are read:
#   1. once every worker is ready (and 0.5 s more, so start-up settles);
#   2. with $CLIENTS connections held open by `connect_storm --hold`
#      (crates/herd-tooling/examples) that no worker can take: every worker
#      is SIGSTOPped first, and the config (written to a temp file) keeps
#      them queued in herd: `handoff.max_unacked = 1` (a stopped worker gets
#      one connection, then is skipped), `handoff.queue_limit` above $CLIENTS,
#      `handoff.queue_timeout = "120s"` and `hang_timeout = "0s"` (so the
#      stopped workers are not found hung and replaced). Read once herd holds
#      a fd for (nearly) every client connection;
#   3. after the clients closed them and the workers were resumed (SIGCONT),
#      once herd's fds are back where they were: what the queue leaves.
# The table has one row per reading, with the growth per worker (against the
# smallest count) and per queued connection (against the same herd ready).
#
# Open files: herd needs about 128 + N × 5 + queue_limit fds and the client
# one per connection; the script raises `ulimit -n` (soft and, as root, the
# hard limit) to $NOFILE first.
#
# Env: WORKER_COUNTS ("1 64 512"), CLIENTS (10000, at most 10000: one
#      connect_storm), NOFILE (65536), OUT (a new temp dir), SKIP_BUILD=1.
# Example:
#   benches/memory.sh
#   WORKER_COUNTS="1 8" CLIENTS=1000 benches/memory.sh     # a quick look
# Loopback only. Every wait has a deadline, the held connections a bounded
# duration, and the script only ever signals the PIDs it started (herd, the
# client) and herd's workers (its children, found by parent PID).
set -euo pipefail
cd "$(dirname "$0")/.."

read -r -a counts <<< "${WORKER_COUNTS:-1 64 512}"
clients=${CLIENTS:-10000}
nofile=${NOFILE:-65536}
bin=${CARGO_TARGET_DIR:-target}/release
for n in "$clients" "$nofile" "${counts[@]}"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "memory.sh: WORKER_COUNTS, CLIENTS and NOFILE must be positive integers" >&2; exit 2; }
done
((clients <= 10000)) || { echo "memory.sh: CLIENTS is at most 10000 (one connect_storm)" >&2; exit 2; }
for n in "${counts[@]}"; do
  ((n <= 1024)) || { echo "memory.sh: herd runs at most 1024 workers" >&2; exit 2; }
done

if (($(ulimit -Hn) < nofile)); then ulimit -Hn "$nofile" 2>/dev/null || true; fi
ulimit -n "$(($(ulimit -Hn) < nofile ? $(ulimit -Hn) : nofile))"
need=$((clients + 128 + 1024 * 5 + 1000))
(($(ulimit -n) >= need)) || echo "memory.sh: ulimit -n is $(ulimit -n), under the ~$need the largest case may need; run as root or raise the hard limit" >&2

if [[ ${SKIP_BUILD:-} != 1 ]]; then
  cargo build --release --workspace -q
  cargo build --release --workspace --examples -q
fi
for f in "$bin/herd" "$bin/hello-worker" "$bin/examples/connect_storm"; do
  [[ -x $f ]] || { echo "memory.sh: $f is missing: cargo build --release --workspace --examples" >&2; exit 2; }
done

out=${OUT:-$(mktemp -d /tmp/herd-memory.XXXXXX)}
mkdir -p "$out/logs"
tmp=$(mktemp -d /tmp/memory-sock.XXXXXX) # control sockets: sun_path is short
cfg="$tmp/herd.toml"
cat >"$cfg" <<EOF
hang_timeout = "0s"
ready_timeout = "60s"

[handoff]
max_unacked = 1
queue_limit = $((clients + 1000))
queue_timeout = "120s"
EOF
cp "$cfg" "$out/herd.toml"

# ---------------------------------------------------------------- processes
started=()  # every PID this script started, for the exit trap
stopped=()  # workers this script SIGSTOPped, resumed by the exit trap

script=memory.sh
# shellcheck source=benches/lib.sh
. benches/lib.sh # alive, descendants, stop_pids, stop_started, free_port
resume() { # the workers this script stopped
  local p
  for p in "${stopped[@]}"; do kill -CONT "$p" 2>/dev/null || true; done
  stopped=()
}
cleanup() {
  resume
  stop_started
}
trap cleanup EXIT
trap 'exit 130' INT TERM

status_field() { # KEY PID -> that /proc/PID/status value in KiB
  awk -v k="$1:" '$1 == k {print $2}' "/proc/$2/status" 2>/dev/null || echo 0
}
fds() { # PID -> its open fds
  find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l
}
ready_workers() {
  "$bin/herd" status --control "$control" --json 2>/dev/null | grep -c '"state": "ready"' || true
}
worker_pids() { # the pids herd's status gives its workers
  "$bin/herd" status --control "$control" --json 2>/dev/null | python3 -c '
import json, sys
print(" ".join(str(w["pid"]) for w in json.load(sys.stdin)["workers"] if w.get("pid")))'
}

# ---------------------------------------------------------------- the runs
{
  echo "date=$(date -u +%Y-%m-%dT%H:%MZ)"
  echo "command=WORKER_COUNTS=\"${counts[*]}\" CLIENTS=$clients benches/memory.sh"
  echo "herd_commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates src benches || echo '+dirty')"
  echo "cpus=$(nproc) × $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "kernel=$(uname -r)"
  echo "nofile=$(ulimit -n)"
} >"$out/env.txt"
results="$out/results.tsv"
printf 'workers\tcase\tclients\trss_kib\thwm_kib\therd_fds\tnote\n' >"$results"

for n in "${counts[@]}"; do
  log="$out/logs/herd-$n.log"
  port=$(free_port) control="$tmp/herd-$n.sock"
  RUST_LOG=warn "$bin/herd" run -c "$cfg" --listen "127.0.0.1:$port" --workers "$n" --rotation handoff \
    --control "$control" -- "$bin/hello-worker" >"$log" 2>&1 &
  herd=$!; started+=("$herd")
  deadline=$((SECONDS + 60)) note=''
  until (($(ready_workers) == n)); do
    alive "$herd" || { note="herd exited before its workers were ready (see $log)"; break; }
    ((SECONDS < deadline)) || { note="not every worker ready within 60 s"; break; }
    sleep 0.2
  done
  if [[ -n $note ]]; then
    echo "memory.sh: $n workers: $note" >&2
    printf '%s\tready\t0\t\t\t\t%s\n' "$n" "$note" >>"$results"
    stop_pids "$herd"; started=()
    continue
  fi
  sleep 0.5
  base_fds=$(fds "$herd")
  printf '%s\tready\t0\t%s\t%s\t%s\t\n' "$n" "$(status_field VmRSS "$herd")" "$(status_field VmHWM "$herd")" "$base_fds" >>"$results"
  echo "memory.sh: $n workers ready: herd VmRSS $(status_field VmRSS "$herd") KiB, $base_fds fds" >&2

  # Nobody can take a connection now: they wait in herd's queue.
  read -r -a pids <<< "$(worker_pids)"
  for p in "${pids[@]}"; do
    # Only herd's own children: the pids status gave, checked by parent PID.
    [[ $(awk '{print $4}' "/proc/$p/stat" 2>/dev/null) == "$herd" ]] || continue
    kill -STOP "$p" && stopped+=("$p")
  done
  hold_log="$out/logs/hold-$n.jsonl"
  "$bin/examples/connect_storm" "127.0.0.1:$port" --hold -c "$clients" -d 60s --timeout 10s >"$hold_log" 2>>"$log" &
  client=$!; started+=("$client")
  deadline=$((SECONDS + 30)) note=''
  until grep -q '"holding"' "$hold_log" 2>/dev/null; do
    alive "$client" || { note="connect_storm ended before holding"; break; }
    ((SECONDS < deadline)) || { note="connects not done within 30 s"; break; }
    sleep 0.1
  done
  # herd holds a fd for each connection it accepted; wait for (nearly) all.
  deadline=$((SECONDS + 15))
  while (($(fds "$herd") < base_fds + clients * 99 / 100)) && ((SECONDS < deadline)); do sleep 0.1; done
  sleep 0.5
  held_fds=$(fds "$herd")
  open=$(grep '"holding"' "$hold_log" 2>/dev/null | grep -o '"open":[0-9]*' | cut -d: -f2 || true)
  ((held_fds - base_fds >= clients * 99 / 100)) || note="${note:+$note; }herd holds only $((held_fds - base_fds)) more fds"
  printf '%s\tqueued\t%s\t%s\t%s\t%s\t%s\n' "$n" "${open:-0}" "$(status_field VmRSS "$herd")" "$(status_field VmHWM "$herd")" "$held_fds" "$note" >>"$results"
  echo "memory.sh: $n workers, ${open:-0} connections held: herd VmRSS $(status_field VmRSS "$herd") KiB, $held_fds fds${note:+ ($note)}" >&2

  # The clients close everything, the workers resume and take what waited.
  stop_pids "$client"
  resume
  deadline=$((SECONDS + 30))
  while (($(fds "$herd") > base_fds + 16)) && ((SECONDS < deadline)); do sleep 0.2; done
  sleep 0.5
  after_fds=$(fds "$herd") note=''
  ((after_fds <= base_fds + 16)) || note="herd still holds $((after_fds - base_fds)) more fds than when ready"
  printf '%s\tclosed\t0\t%s\t%s\t%s\t%s\n' "$n" "$(status_field VmRSS "$herd")" "$(status_field VmHWM "$herd")" "$after_fds" "$note" >>"$results"
  alive "$herd" || echo "memory.sh: herd with $n workers died; see $log" >&2
  stop_pids "$herd"
  started=() # forget them: a PID stopped now may be someone else's by the exit trap
done

echo "results in $out" >&2
python3 - "$out" <<'EOF'
import csv, os, sys
out = sys.argv[1]
env = dict(l.rstrip("\n").split("=", 1) for l in open(os.path.join(out, "env.txt")) if "=" in l)
rows = list(csv.DictReader(open(os.path.join(out, "results.tsv")), delimiter="\t"))
ready = {r["workers"]: int(r["rss_kib"]) for r in rows if r["case"] == "ready" and r["rss_kib"]}
first = min(ready, key=int) if ready else None
print(f"herd primary's memory ({env.get('date')}; {env.get('cpus')}; herd {env.get('herd_commit')})")
print()
print(f"```sh\n{env.get('command')}\n```")
print()
print("| case | herd VmRSS KiB | herd VmHWM KiB | herd fds | delta |")
print("|---|--:|--:|--:|---|")
for r in rows:
    n, case = r["workers"], r["case"]
    label = {"ready": f"{n} workers, ready",
             "queued": f"{n} workers (stopped), {int(r['clients']):,} connections queued",
             "closed": f"{n} workers, the connections closed"}[case]
    delta = ""
    if r["rss_kib"] and case == "ready" and first is not None and n != first:
        per = (int(r["rss_kib"]) - ready[first]) / (int(n) - int(first))
        delta = f"{per:+.1f} KiB per worker (vs {first})"
    elif r["rss_kib"] and case == "queued" and n in ready and int(r["clients"]):
        per = (int(r["rss_kib"]) - ready[n]) * 1024 / int(r["clients"])
        delta = f"{per:+.0f} bytes per queued connection"
    elif r["rss_kib"] and case == "closed" and n in ready:
        delta = f"{int(r['rss_kib']) - ready[n]:+,} KiB vs ready"
    if r["note"]:
        delta = (delta + "; " if delta else "") + r["note"]
    cells = [label, f"{int(r['rss_kib']):,}" if r["rss_kib"] else "-",
             f"{int(r['hwm_kib']):,}" if r["hwm_kib"] else "-", r["herd_fds"] or "-", delta]
    print("| " + " | ".join(cells) + " |")
EOF
