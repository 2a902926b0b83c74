#!/usr/bin/env bash
# The primary's own ceiling: how many connections per second herd's
# hand-off can deal when the workers do nothing with them.
#
# herd runs round-robin with hand-offs (`--rotation handoff`) in front of
# $WORKERS `close_at_once` workers (crates/herd-worker/examples), which drop
# each connection as soon as they have it: the primary's accept + hand-off is
# the only work per connection. $LOADERS `connect_storm` processes
# (crates/herd-tooling/examples) each run $CONNECTIONS loops of connect,
# wait for the close, connect again, for $DURATION. Measured over each load:
#   - the connection rate (the loaders' completed connections per second);
#   - herd's CPU per connection: utime + stime of herd's process (every
#     thread, /proc/PID/stat) and of its hand-off thread(s) alone (the
#     threads whose /proc/PID/task/TID/comm starts with `herd-handoff`);
#   - the hand-off thread's utilisation (its CPU time / wall time; with
#     several hand-off threads, the busiest one's) and the rate at which it
#     would saturate (rate / utilisation = 1 / its CPU per connection);
#   - how busy the front's and the loaders' CPUs were (/proc/stat), so a
#     ceiling that is the loaders' and not herd's shows as such.
# If `herd run --help` lists `--handoff-threads`, each count of $THREADS is
# run; otherwise herd runs once per round as it is, and the table says so.
# Runs are interleaved (round 1: every thread count, round 2: ...), and the
# table gives the median over $ROUNDS rounds of each column.
#
# Pinning (taskset): herd and its workers on $FRONT_CPUS, the loaders on
# $LOAD_CPUS, so the load generator does not take the primary's CPU. The
# defaults split `nproc` in halves: on 2 cores herd + workers on cpu 0 and
# the loaders on cpu 1. On a many-core machine give the front as many cores
# as it should use and the loaders enough to never be the limit (check the
# "load CPUs busy" column stays well under 100 %), e.g. on 32 cores:
#   FRONT_CPUS=0-7 LOAD_CPUS=8-31 WORKERS=8 LOADERS=8 THREADS="1 2 4" benches/ceiling.sh
#
# Env: WORKERS (2), LOADERS (2), CONNECTIONS (50, per loader), DURATION (3s,
#      at most 10m), ROUNDS (3), THREADS ("1 2"), HERD_ARGS (extra `herd run`
#      flags, e.g. "--max-unacked 256"; `--mode round-robin --rotation
#      handoff` are added unless HERD_ARGS names a mode or rotation),
#      FRONT_CPUS, LOAD_CPUS (cpu lists for taskset, see above), OUT (a new
#      temp dir), SOURCE_RANGE (e.g. 127.0.0.2-127.0.0.51; unset: 127.0.0.1),
#      SKIP_BUILD=1 (use the binaries as built).
# Example:
#   DURATION=3s ROUNDS=3 benches/ceiling.sh
# Loopback only. Every load is bounded by DURATION, every wait by a deadline,
# and the script only ever signals the PIDs it started (and their children).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${CARGO_TARGET_DIR:-target}/release
workers=${WORKERS:-2}
loaders=${LOADERS:-2}
connections=${CONNECTIONS:-50}
duration=${DURATION:-3s}
rounds=${ROUNDS:-3}
read -r -a thread_counts <<< "${THREADS:-1 2}"
read -r -a herd_args <<< "${HERD_ARGS:-}"
source_range=${SOURCE_RANGE:-}
range_args=()
[[ -n $source_range ]] && range_args=(--source-range "$source_range")

dur_ok=$(python3 -c 'import re, sys; print(bool(re.fullmatch(r"[0-9.]+(ms|s|m)", sys.argv[1])))' "$duration")
[[ $dur_ok == True ]] || { echo "ceiling.sh: DURATION must look like 3s, 500ms or 1m" >&2; exit 2; }
for n in "$workers" "$loaders" "$connections" "$rounds" "${thread_counts[@]}"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "ceiling.sh: WORKERS, LOADERS, CONNECTIONS, ROUNDS and THREADS must be positive integers" >&2; exit 2; }
done
command -v taskset >/dev/null || { echo "ceiling.sh: taskset (util-linux) is needed for the pinning" >&2; exit 2; }

cores=$(nproc)
if ((cores >= 2)); then
  half=$((cores / 2))
  front_cpus=${FRONT_CPUS:-0-$((half - 1))}
  load_cpus=${LOAD_CPUS:-$half-$((cores - 1))}
else
  front_cpus=${FRONT_CPUS:-0} load_cpus=${LOAD_CPUS:-0}
  echo "ceiling.sh: 1 core: herd and the loaders share it; the figures measure both" >&2
fi

# Each loader holds up to CONNECTIONS sockets; herd raises its own limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if [[ ${SKIP_BUILD:-} != 1 ]]; then
  cargo build --release --workspace -q
  cargo build --release --workspace --examples -q
fi
for f in "$bin/herd" "$bin/examples/close_at_once" "$bin/examples/connect_storm"; do
  [[ -x $f ]] || { echo "ceiling.sh: $f is missing: cargo build --release --workspace --examples" >&2; exit 2; }
done

out=${OUT:-$(mktemp -d /tmp/herd-ceiling.XXXXXX)}
mkdir -p "$out/json" "$out/logs"
tmp=$(mktemp -d /tmp/ceiling-sock.XXXXXX) # control sockets: sun_path is short

# ---------------------------------------------------------------- processes
started=() # every PID this script started, for the exit trap

script=ceiling.sh
# shellcheck source=benches/lib.sh
. benches/lib.sh # alive, descendants, stop_pids, stop_started, free_port, wait_exit, dur_secs, expand_cpus
trap stop_started EXIT
trap 'exit 130' INT TERM


stop_tree() { # PID: it first (herd drains its workers itself), then what is left of its descendants
  local rest=() p
  mapfile -t rest < <(descendants "$1")
  stop_pids "$1"
  for p in "${!rest[@]}"; do alive "${rest[$p]}" || unset 'rest[p]'; done
  ((${#rest[@]})) && stop_pids "${rest[@]}"
  started=() # forget them: a PID stopped now may be someone else's by the exit trap
  return 0
}


ticks() { # /proc/.../stat file -> utime + stime in clock ticks (0 if gone)
  local v
  v=$(sed 's/.*) //' "$1" 2>/dev/null | awk '{print $12 + $13}' || true)
  echo "${v:-0}"
}
handoff_ticks() { # PID -> "TID:TICKS,TID:TICKS" for its threads named herd-handoff*
  local t list=()
  for t in /proc/"$1"/task/*; do
    [[ $(cat "$t/comm" 2>/dev/null) == herd-handoff* ]] && list+=("${t##*/}:$(ticks "$t/stat")")
  done
  local IFS=,; echo "${list[*]}"
}
cpu_jiffies() { # "CPU..." -> "BUSY TOTAL" summed over those CPUs' /proc/stat lines
  local want=" $1 "
  awk -v want="$want" '$1 ~ /^cpu[0-9]+$/ { n = substr($1, 4); if (index(want, " " n " ")) {
      t = 0; for (i = 2; i <= 9; i++) t += $i; busy += t - $5 - $6; total += t } }
    END { print busy + 0, total + 0 }' /proc/stat
}
front_cpu_ids=$(expand_cpus "$front_cpus")
load_cpu_ids=$(expand_cpus "$load_cpus")

herd_all_ready() { # CONTROL -> true when every worker of that herd says ready
  local n
  n=$("$bin/herd" status --control "$1" --json 2>/dev/null | grep -c '"state": "ready"' || true)
  ((n == workers))
}

# ---------------------------------------------------------------- variants
variants=() # herd flags of each variant, one string each
has_threads=no
if "$bin/herd" run --help 2>/dev/null | grep -q -- '--handoff-threads'; then
  has_threads=yes
  for t in "${thread_counts[@]}"; do variants+=("--handoff-threads $t"); done
else
  echo "ceiling.sh: this herd has no --handoff-threads flag; one run per round with its one hand-off thread" >&2
  variants=("")
fi
base_args=()
[[ " ${herd_args[*]} " == *" --mode "* || " ${herd_args[*]} " == *" -m "* ]] || base_args+=(--mode round-robin)
[[ " ${herd_args[*]} " == *" --rotation "* ]] || base_args+=(--rotation handoff)

{
  echo "date=$(date -u +%Y-%m-%dT%H:%MZ)"
  echo "command=WORKERS=$workers LOADERS=$loaders CONNECTIONS=$connections DURATION=$duration ROUNDS=$rounds THREADS=\"${thread_counts[*]}\" HERD_ARGS=\"${herd_args[*]}\" FRONT_CPUS=$front_cpus LOAD_CPUS=$load_cpus${source_range:+ SOURCE_RANGE=$source_range} benches/ceiling.sh"
  echo "herd_commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates src benches || echo '+dirty')"
  echo "cpus=$cores × $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "kernel=$(uname -r)"
  echo "handoff_threads_flag=$has_threads"
  echo "herd_flags=${base_args[*]} ${herd_args[*]}"
  echo "clk_tck=$(getconf CLK_TCK)"
  echo "load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)"
} >"$out/env.txt"

index="$out/index.tsv"
printf 'round\tvariant\tstatus\twall_s\therd_ticks\thandoff_ticks\tfront_busy\tfront_total\tload_busy\tload_total\tjson\n' >"$index"
clk=$(getconf CLK_TCK)

for ((round = 1; round <= rounds; round++)); do
  for v in "${!variants[@]}"; do
    variant=${variants[$v]}
    name=${variant:-default}; name=${name// /=}; name=${name#--}
    log="$out/logs/r${round}_$name.log"
    port=$(free_port) control="$tmp/herd-$round-$v.sock"
    read -r -a vargs <<< "$variant"
    RUST_LOG=warn taskset -c "$front_cpus" "$bin/herd" run -c /dev/null --listen "127.0.0.1:$port" \
      --workers "$workers" --control "$control" "${base_args[@]}" "${herd_args[@]}" "${vargs[@]}" \
      -- "$bin/examples/close_at_once" >"$log" 2>&1 &
    herd=$!; started+=("$herd")
    deadline=$((SECONDS + 30)) status=ok
    until herd_all_ready "$control"; do
      if ! alive "$herd"; then status="herd exited before its workers were ready"; break; fi
      if ((SECONDS >= deadline)); then status="workers not ready within 30 s"; break; fi
      sleep 0.1
    done
    if [[ $status != ok ]]; then
      echo "round $round: $name FAILED: $status; log: $log" >&2
      printf '%s\t%s\t%s\t\t\t\t\t\t\t\t\n' "$round" "$name" "$status" >>"$index"
      stop_tree "$herd"
      continue
    fi
    # Warm-up, not recorded.
    taskset -c "$load_cpus" "$bin/examples/connect_storm" "127.0.0.1:$port" -c "$connections" -d 300ms \
      "${range_args[@]}" >/dev/null

    t0=$(date +%s.%N); h0=$(ticks "/proc/$herd/stat"); o0=$(handoff_ticks "$herd")
    read -r fb0 ft0 <<< "$(cpu_jiffies "$front_cpu_ids")"; read -r lb0 lt0 <<< "$(cpu_jiffies "$load_cpu_ids")"
    pids=() jsons=()
    for ((l = 0; l < loaders; l++)); do
      json="json/r${round}_${name}_l$l.json"; jsons+=("$json")
      taskset -c "$load_cpus" "$bin/examples/connect_storm" "127.0.0.1:$port" -c "$connections" \
        -d "$duration" "${range_args[@]}" >"$out/$json" 2>>"$log" &
      pids+=("$!"); started+=("$!")
    done
    wait_exit $(($(dur_secs "$duration") + 30)) "${pids[@]}" || status="a loader outlived its duration"
    t1=$(date +%s.%N); h1=$(ticks "/proc/$herd/stat"); o1=$(handoff_ticks "$herd")
    read -r fb1 ft1 <<< "$(cpu_jiffies "$front_cpu_ids")"; read -r lb1 lt1 <<< "$(cpu_jiffies "$load_cpu_ids")"
    alive "$herd" || status="herd died during the load"
    # Per hand-off thread: TID:TICKS during the load.
    per_thread=$(python3 -c '
import sys
before = dict(p.split(":") for p in sys.argv[1].split(",") if p)
after = dict(p.split(":") for p in sys.argv[2].split(",") if p)
print(",".join(f"{t}:{int(after[t]) - int(before.get(t, 0))}" for t in after))' "$o0" "$o1")
    wall=$(python3 -c "print(f'{$t1 - $t0:.6f}')")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$status" "$wall" \
      $((h1 - h0)) "$per_thread" $((fb1 - fb0)) $((ft1 - ft0)) $((lb1 - lb0)) $((lt1 - lt0)) \
      "$(IFS=,; echo "${jsons[*]}")" >>"$index"
    echo "round $round/$rounds  $name  $(cat "${jsons[@]/#/$out/}" | python3 -c 'import sys, json; print(round(sum(json.loads(l)["conn_per_sec"] for l in sys.stdin if l.strip())))') conn/s  herd ticks $((h1 - h0)) (clk $clk)" >&2
    stop_tree "$herd"
  done
done
echo "load_at_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/env.txt"

echo "results in $out" >&2
python3 benches/summarise_tables.py ceiling "$out"
