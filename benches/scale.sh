#!/usr/bin/env bash
# Connection rate against the number of workers, for herd's ways of dealing
# connections and for the fronts herd stands in for, on this machine.
#
# Setups (select with SETUPS="a b ..."), each with N = every count of
# $WORKER_COUNTS workers; herd and HAProxy run target/release/hello-worker:
#   herd-handoff   herd round-robin, `--rotation handoff`: herd accepts each
#                  connection and hands it over the worker's channel
#   herd-kernel    herd round-robin, `--rotation kernel`: an eBPF program deals
#                  the turns over per-slot sockets (needs CAP_BPF; where herd
#                  refuses it or falls back to hand-offs, the row says skipped)
#   herd-reuseport herd `--mode reuseport`: one SO_REUSEPORT socket per slot
#   herd-shared    herd `--mode shared`: every worker accepts from one socket
#   node-rr        Node's own cluster primary (the seed's unmodified
#                  workers/node/cluster-server.js), NODE_CLUSTER_SCHED_POLICY=rr;
#                  benches/scale_node_workers.js, preloaded with `node -r`,
#                  makes its os.cpus() report N so that it forks N workers
#   node-none      the same, NODE_CLUSTER_SCHED_POLICY=none (the kernel spreads)
#   haproxy        HAProxy, mode tcp, balance roundrobin, nbthread =
#                  $HAPROXY_NBTHREAD (default: the number of FRONT_CPUS), in
#                  front of N hello-workers each on its own port
# Load: $LOADERS `herd bench` processes, each $CLIENTS clients for $DURATION,
# a new connection per request (SHAPES=close; add `keepalive` for keep-alive
# connections, a second table in requests/s). Cells are the loaders' summed
# rate, median over $ROUNDS rounds. Runs are interleaved: each round runs
# every worker count of every setup once, so drift hits all alike.
#
# Pinning (taskset): the front and its workers on $FRONT_CPUS, the load on
# $LOAD_CPUS. The defaults split `nproc` in halves: on 2 cores the front
# and all its workers on cpu 0, the load on cpu 1, so here more workers only
# add processes to one core, and the table shows each front's cost, not
# scaling. On a many-core machine give the front the cores to scale onto and
# the load enough cores and loaders never to be the limit, e.g. on 64 cores:
#   FRONT_CPUS=0-31 LOAD_CPUS=32-63 LOADERS=8 CLIENTS=64 HAPROXY_NBTHREAD=32 \
#     WORKER_COUNTS="1 2 4 8 16 32" benches/scale.sh
#
# Env: SETUPS (all above), WORKER_COUNTS ("1 2 4 8 16"), ROUNDS (3),
#      DURATION (3s, at most 10m), LOADERS (1), CLIENTS (50), SHAPES
#      ("close"; "close keepalive"), FRONT_CPUS, LOAD_CPUS, HAPROXY_NBTHREAD,
#      OUT (a new temp dir), SKIP_BUILD=1 (use the binaries as built).
# Example:
#   DURATION=3s ROUNDS=3 benches/scale.sh
# A setup that cannot start (node or haproxy missing, a mode herd refuses)
# is recorded as failed or skipped and the run goes on. Loopback only. Every
# load is bounded by DURATION, every wait by a deadline, and the script only
# ever signals the PIDs it started (and their children).
set -euo pipefail
cd "$(dirname "$0")/.."

all_setups="herd-handoff herd-kernel herd-reuseport herd-shared node-rr node-none haproxy"
read -r -a setups <<< "${SETUPS:-$all_setups}"
read -r -a counts <<< "${WORKER_COUNTS:-1 2 4 8 16}"
read -r -a shapes <<< "${SHAPES:-close}"
rounds=${ROUNDS:-3}
duration=${DURATION:-3s}
loaders=${LOADERS:-1}
clients=${CLIENTS:-50}
bin=${CARGO_TARGET_DIR:-target}/release

for s in "${setups[@]}"; do
  case " $all_setups " in *" $s "*) ;; *) echo "scale.sh: unknown setup '$s' (known: $all_setups)" >&2; exit 2 ;; esac
done
for s in "${shapes[@]}"; do
  case $s in close | keepalive) ;; *) echo "scale.sh: unknown shape '$s' (close, keepalive)" >&2; exit 2 ;; esac
done
for n in "$rounds" "$loaders" "$clients" "${counts[@]}"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "scale.sh: WORKER_COUNTS, ROUNDS, LOADERS and CLIENTS must be positive integers" >&2; exit 2; }
done
[[ $duration =~ ^[0-9.]+(ms|s|m)$ ]] || { echo "scale.sh: DURATION must look like 3s, 500ms or 1m" >&2; exit 2; }
command -v taskset >/dev/null || { echo "scale.sh: taskset (util-linux) is needed for the pinning" >&2; exit 2; }

cores=$(nproc)
if ((cores >= 2)); then
  half=$((cores / 2))
  front_cpus=${FRONT_CPUS:-0-$((half - 1))}
  load_cpus=${LOAD_CPUS:-$half-$((cores - 1))}
else
  front_cpus=${FRONT_CPUS:-0} load_cpus=${LOAD_CPUS:-0}
  echo "scale.sh: 1 core: the front and the load share it" >&2
fi
script=scale.sh
# shellcheck source=benches/lib.sh
. benches/lib.sh # alive, descendants, stop_pids, stop_started, free_port, haproxy_head, answers, wait_exit, dur_secs, expand_cpus
read -r -a front_cpu_ids <<< "$(expand_cpus "$front_cpus")"
nbthread=${HAPROXY_NBTHREAD:-${#front_cpu_ids[@]}}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if [[ ${SKIP_BUILD:-} != 1 ]]; then
  cargo build --release --workspace -q
fi
for f in "$bin/herd" "$bin/hello-worker"; do
  [[ -x $f ]] || { echo "scale.sh: $f is missing: cargo build --release --workspace" >&2; exit 2; }
done

out=${OUT:-$(mktemp -d /tmp/herd-scale.XXXXXX)}
mkdir -p "$out/json" "$out/logs"
tmp=$(mktemp -d /tmp/scale-sock.XXXXXX) # control sockets: sun_path is short

# ---------------------------------------------------------------- processes
started=() # every PID this script started, for the exit trap

trap stop_started EXIT
trap 'exit 130' INT TERM



# wait_ready PID PORT CHECK: poll until PORT answers and CHECK succeeds, for
# at most 30 s (60 s for 100 workers or more). Fails early, with why in
# $exit_code, if PID exits first (e.g. herd refusing a mode).
exit_code=
wait_ready() {
  local pid=$1 port=$2 check=$3 deadline=$((SECONDS + (n >= 100 ? 60 : 30)))
  while ((SECONDS < deadline)); do
    if ! alive "$pid"; then
      local rc=0; wait "$pid" 2>/dev/null || rc=$?
      exit_code="exited with code $rc before answering"; return 1
    fi
    if answers "$port" && $check; then return 0; fi
    sleep 0.1
  done
  exit_code="did not answer in time"
  return 1
}
true_check() { true; }
herd_all_ready() {
  local ready
  ready=$("$bin/herd" status --control "$control" --json 2>/dev/null | grep -c '"state": "ready"' || true)
  ((ready == n))
}
node_all_started() { # the seed's workers log "Worker PID started" once listening
  local started_lines
  started_lines=$(grep -c '^Worker [0-9]* started' "$log" || true)
  ((started_lines >= n))
}

# ---------------------------------------------------------------- setups
# start_SETUP starts the front with $n workers on $FRONT_CPUS and sets front
# (its PID), extra (PIDs started beside it) and port; non-zero if it never
# answered (why in $exit_code; "skipped: ..." for a setup this host lacks).
front='' extra=() port='' log='' control=''
front_run() { taskset -c "$front_cpus" "$@"; }

start_herd() { # herd run flags...
  port=$(free_port); control="$tmp/herd-$n.sock"
  RUST_LOG=warn front_run "$bin/herd" run -c /dev/null --listen "127.0.0.1:$port" --workers "$n" \
    --control "$control" "$@" -- "$bin/hello-worker" >"$log" 2>&1 &
  front=$!; started+=("$front")
  wait_ready "$front" "$port" herd_all_ready
}

start_herd_kernel() {
  if ! start_herd --mode round-robin --rotation kernel; then
    grep -qi 'CAP_BPF\|bpf' "$log" && exit_code="skipped: herd refused the kernel rotation ($(grep -i -m1 'bpf' "$log" | cut -c1-160))"
    return 1
  fi
  if grep -q 'kernel_rotation_unavailable' "$log"; then
    exit_code="skipped: herd fell back from the kernel rotation ($(grep -m1 kernel_rotation_unavailable "$log" | cut -c1-160))"
    return 1
  fi
}

start_node() { # POLICY
  command -v node >/dev/null || { exit_code="skipped: node not installed"; return 1; }
  port=$(free_port)
  NODE_WORKERS=$n NODE_CLUSTER_SCHED_POLICY=$1 PORT=$port front_run node -r "$PWD/benches/scale_node_workers.js" \
    workers/node/cluster-server.js >"$log" 2>&1 &
  front=$!; started+=("$front")
  wait_ready "$front" "$port" node_all_started
}

start_haproxy() {
  command -v haproxy >/dev/null || { exit_code="skipped: haproxy not installed"; return 1; }
  port=$(free_port)
  local cfg="$tmp/haproxy.cfg" i p
  haproxy_head "$cfg" "$port" "$nbthread"
  for ((i = 0; i < n; i++)); do
    p=$(free_port)
    front_run "$bin/hello-worker" --listen "127.0.0.1:$p" >>"$log" 2>&1 & extra+=("$!"); started+=("$!")
    wait_ready "$!" "$p" true_check || return 1
    echo "    server w$i 127.0.0.1:$p" >>"$cfg"
  done
  cp "$cfg" "$out/haproxy-$n.cfg"
  haproxy -c -q -f "$cfg" >>"$log" 2>&1 || { exit_code="haproxy -c rejected the config"; return 1; }
  front_run haproxy -db -f "$cfg" >>"$log" 2>&1 & front=$!; started+=("$front")
  wait_ready "$front" "$port" true_check
}

start() { # SETUP
  front='' extra=() exit_code=''
  case $1 in
    herd-handoff) start_herd --mode round-robin --rotation handoff ;;
    herd-kernel) start_herd_kernel ;;
    herd-reuseport) start_herd --mode reuseport ;;
    herd-shared) start_herd --mode shared ;;
    node-rr) start_node rr ;;
    node-none) start_node none ;;
    haproxy) start_haproxy ;;
  esac
}

stop() { # the current setup: its front first (herd drains, a Node primary would re-fork), then the rest
  local rest=() p
  for p in ${front:+"$front"} "${extra[@]}"; do
    alive "$p" && mapfile -t -O "${#rest[@]}" rest < <(descendants "$p")
  done
  rest+=("${extra[@]}")
  [[ -n $front ]] && alive "$front" && stop_pids "$front"
  for p in "${!rest[@]}"; do alive "${rest[$p]}" || unset 'rest[p]'; done
  ((${#rest[@]})) && stop_pids "${rest[@]}"
  started=() # forget them: a PID stopped now may be someone else's by the exit trap
  return 0
}

load_limit=$(($(dur_secs "$duration") + 30))

# ---------------------------------------------------------------- the runs
{
  echo "date=$(date -u +%Y-%m-%dT%H:%MZ)"
  echo "command=SETUPS=\"${setups[*]}\" WORKER_COUNTS=\"${counts[*]}\" ROUNDS=$rounds DURATION=$duration LOADERS=$loaders CLIENTS=$clients SHAPES=\"${shapes[*]}\" FRONT_CPUS=$front_cpus LOAD_CPUS=$load_cpus HAPROXY_NBTHREAD=$nbthread benches/scale.sh"
  echo "herd_commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates src workers benches || echo '+dirty')"
  echo "cpus=$cores × $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "kernel=$(uname -r)"
  echo "node=$(node --version 2>/dev/null || echo none)"
  echo "haproxy=$(haproxy -v 2>/dev/null | awk 'NR==1 {print $3}' || echo none)"
  echo "setups=${setups[*]}"
  echo "worker_counts=${counts[*]}"
  echo "shapes=${shapes[*]}"
  echo "clients=$clients"
  echo "loaders=$loaders"
  echo "rounds=$rounds"
  echo "load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)"
} >"$out/env.txt"
index="$out/index.tsv"
printf 'round\tsetup\tworkers\tshape\tstatus\tjson\n' >"$index"

for ((round = 1; round <= rounds; round++)); do
  for n in "${counts[@]}"; do
    for s in "${setups[@]}"; do
      log="$out/logs/r${round}_${s}_$n.log"
      if ! start "$s"; then
        echo "round $round: $s with $n workers: ${exit_code:-?}; log: $log" >&2
        for shape in "${shapes[@]}"; do
          printf '%s\t%s\t%s\t%s\t%s\t\n' "$round" "$s" "$n" "$shape" "${exit_code:-?}" >>"$index"
        done
        stop
        continue
      fi
      # Warm-up, not recorded: JITs, caches, first-connection costs.
      taskset -c "$load_cpus" "$bin/herd" bench "127.0.0.1:$port" -c "$clients" -d 300ms --new-connection-per-request >/dev/null
      for shape in "${shapes[@]}"; do
        args=(-c "$clients" -d "$duration" --json)
        [[ $shape == close ]] && args+=(--new-connection-per-request)
        pids=() jsons=()
        for ((l = 0; l < loaders; l++)); do
          json="json/r${round}_${s}_${n}_${shape}_l$l.json"; jsons+=("$json")
          taskset -c "$load_cpus" "$bin/herd" bench "http://127.0.0.1:$port/" "${args[@]}" >"$out/$json" 2>>"$log" &
          pids+=("$!"); started+=("$!")
        done
        status=ok
        wait_exit "$load_limit" "${pids[@]}" || status="a loader outlived its duration"
        alive "$front" || status="the front died during the load"
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$s" "$n" "$shape" "$status" "$(IFS=,; echo "${jsons[*]}")" >>"$index"
        echo "round $round/$rounds  $s  $n workers  $shape  $(cat "${jsons[@]/#/$out/}" | grep -o '"connections_per_sec": [0-9.]*' | awk '{s += $2} END {printf "%d", s}') conn/s" >&2
      done
      stop
    done
  done
done
echo "load_at_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/env.txt"

echo "results in $out" >&2
python3 benches/summarise_tables.py scale "$out"
