#!/usr/bin/env bash
# herd side by side with other fronts, on this machine, with `herd bench`.
#
# Setups (select with SETUPS="a b ..."; include `direct`: ratios are relative to it):
#   direct           one hello-worker --listen, no front at all
#   herd-MODE        herd run --mode MODE with $WORKERS hello-workers
#                    (MODE: round-robin sticky least-conn shared reuseport)
#   herd-kernel      round-robin dealt by the kernel (--rotation kernel): an
#                    SK_REUSEPORT program over one socket per hello-worker
#   herd-threads     round-robin hand-offs from two hand-off threads
#                    (--handoff-threads 2), each on its own SO_REUSEPORT copy
#   herd-node        herd (round-robin) as the primary of the seed's unmodified
#                    Node cluster example ($WORKERS Node workers); no --listen:
#                    herd binds what the app asks for (PORT), as Node's primary;
#                    the kernel rotation deals the turns (--rotation auto)
#   herd-node-handoff the same with --rotation handoff: herd accepts each
#                    connection and hands it over Node's cluster channel
#   herd-node-shared the same with --mode shared: herd sends the workers the
#                    listening socket and they accept themselves
#   node-rr          the seed's Node cluster example, NODE_CLUSTER_SCHED_POLICY=rr
#   node-none        the same, NODE_CLUSTER_SCHED_POLICY=none (the kernel spreads accepts)
#   haproxy          HAProxy, mode tcp, balance roundrobin, in front of $WORKERS
#                    hello-workers each on its own port (nbthread $HAPROXY_NBTHREAD)
# Load shapes, each `herd bench --json` for $DURATION:
#   close-1, close-50          a new connection per request, 1 / 50 concurrent
#   keepalive-1, keepalive-50  keep-alive connections, 1 / 50 concurrent
#
# Runs are interleaved: for each round, each setup is started, warmed up, run
# through every shape and stopped, so drift on this shared 2-core machine hits
# every setup alike. Every JSON report is kept in $OUT with an index.tsv, and
# benches/summarise_fronts.py prints the medians as Markdown at the end.
#
# A setup that cannot start (a mode this build lacks exits 2, node or haproxy
# missing) is recorded as failed and the run goes on.
#
# Env: SETUPS, WORKERS (2), ROUNDS (3), DURATION (3s), OUT (a new temp dir),
#      HAPROXY_NBTHREAD (1), SOURCE_RANGE (unset: every client connects from
#      127.0.0.1; e.g. 127.0.0.2-127.0.0.51 to give sticky mode many clients).
# Loopback only. Every load is bounded by DURATION, every wait by a deadline,
# and the script only ever signals the PIDs it started (and their children).
set -euo pipefail
cd "$(dirname "$0")/.."

all_setups="direct herd-round-robin herd-threads herd-kernel herd-sticky herd-least-conn herd-shared herd-reuseport herd-node herd-node-handoff herd-node-shared node-rr node-none haproxy"
read -r -a setups <<< "${SETUPS:-$all_setups}"
workers=${WORKERS:-2}
rounds=${ROUNDS:-3}
duration=${DURATION:-3s}
nbthread=${HAPROXY_NBTHREAD:-1}
source_range=${SOURCE_RANGE:-}
range_args=()
[[ -n $source_range ]] && range_args=(--source-range "$source_range")
shapes=(close-1 close-50 keepalive-1 keepalive-50)

for s in "${setups[@]}"; do
  case " $all_setups " in *" $s "*) ;; *) echo "fronts.sh: unknown setup '$s' (known: $all_setups)" >&2; exit 2 ;; esac
done
[[ $workers =~ ^[1-9][0-9]*$ && $rounds =~ ^[1-9][0-9]*$ ]] || { echo "fronts.sh: WORKERS and ROUNDS must be positive integers" >&2; exit 2; }

out=${OUT:-$(mktemp -d /tmp/herd-fronts.XXXXXX)}
mkdir -p "$out/json" "$out/logs"
# Control sockets live in a short private dir (sun_path is 108 bytes at most).
tmp=$(mktemp -d /tmp/fronts-sock.XXXXXX)
bin=target/release

cargo build --release --workspace -q

# ---------------------------------------------------------------- processes
started=()   # every PID this script started, for the exit trap

script=fronts.sh
# shellcheck source=benches/lib.sh
. benches/lib.sh # alive, descendants, stop_pids, stop_started, free_port, haproxy_head, answers
trap stop_started EXIT
trap 'exit 130' INT TERM



# wait_ready PID PORT CHECK: poll until PORT answers and CHECK (a command)
# succeeds, for at most 30 s. Fails early, with PID's exit code in $exit_code,
# if PID exits first (e.g. herd refusing a mode this build does not have).
exit_code=
wait_ready() {
  local pid=$1 port=$2 check=$3 deadline=$((SECONDS + 30))
  while ((SECONDS < deadline)); do
    if ! alive "$pid"; then
      local rc=0; wait "$pid" 2>/dev/null || rc=$?
      exit_code="exited with code $rc before answering"; return 1
    fi
    if answers "$port" && $check; then return 0; fi
    sleep 0.1
  done
  exit_code="did not answer within 30 s"
  return 1
}
true_check() { true; }
herd_all_ready() { # every worker of the herd on $control says ready
  local n
  n=$("$bin/herd" status --control "$control" --json 2>/dev/null | grep -c '"state": "ready"' || true)
  ((n == workers))
}
node_all_started() { # the seed's workers log "Worker PID started" once listening
  local n
  n=$(grep -c '^Worker [0-9]* started' "$log" || true)
  ((n >= node_workers)) # a worker restarted by the seed's exit handler logs again
}

rss_kib() { # PIDs... -> summed VmRSS in KiB
  local p total=0 v
  for p in "$@"; do
    v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
cpu_ticks() { # PIDs... -> summed user + system CPU time in clock ticks (all threads)
  local p total=0 v
  for p in "$@"; do
    # Fields 14 and 15 of /proc/PID/stat, counted after the ") " that ends
    # the command name (which may itself contain spaces).
    v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}' || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# ---------------------------------------------------------------- setups
# start_SETUP sets: front (the PID whose RSS is "the front's": herd's primary,
# Node's primary, haproxy, or for direct the worker itself), extra (other
# PIDs started beside it, e.g. HAProxy's backends), port, expect (number of
# workers answering), and returns non-zero if it never answered.
front='' extra=() port='' expect='' log='' control=''
node_workers=$(node -e 'console.log(require("os").cpus().length)' 2>/dev/null || nproc)

start_direct() {
  port=$(free_port); expect=1
  "$bin/hello-worker" --listen "127.0.0.1:$port" >"$log" 2>&1 & front=$!; started+=("$front")
  wait_ready "$front" "$port" true_check
}

start_herd() { # MODE [ROTATION [HANDOFF_THREADS]]
  port=$(free_port); expect=$workers; control="$tmp/herd-$1${2:+-$2}${3:+-$3}.sock"
  RUST_LOG=warn "$bin/herd" run -c /dev/null --listen "127.0.0.1:$port" --workers "$workers" \
    --mode "$1" ${2:+--rotation "$2"} ${3:+--handoff-threads "$3"} --control "$control" -- "$bin/hello-worker" >"$log" 2>&1 & front=$!; started+=("$front")
  wait_ready "$front" "$port" herd_all_ready
}

start_herd_node() { # MODE ROTATION
  port=$(free_port); expect=$workers; control="$tmp/herd-node-$1-$2.sock"
  PORT=$port RUST_LOG=warn "$bin/herd" run -c /dev/null --workers "$workers" --mode "$1" \
    --rotation "$2" --control "$control" -- node workers/node/cluster-server.js >"$log" 2>&1 & front=$!; started+=("$front")
  wait_ready "$front" "$port" herd_all_ready
}

start_node() { # POLICY
  command -v node >/dev/null || { exit_code="node not installed"; return 1; }
  # The seed forks os.cpus().length workers; say so if that is not $WORKERS.
  port=$(free_port); expect=$node_workers
  NODE_CLUSTER_SCHED_POLICY=$1 PORT=$port node workers/node/cluster-server.js >"$log" 2>&1 & front=$!; started+=("$front")
  wait_ready "$front" "$port" node_all_started
}

start_haproxy() {
  command -v haproxy >/dev/null || { exit_code="haproxy not installed"; return 1; }
  port=$(free_port); expect=$workers
  local cfg="$tmp/haproxy.cfg" i p
  # nbthread 1 by default: one thread, like herd's primary and Node's primary
  # event loop. HAProxy's own default would be one thread per core (2 here).
  haproxy_head "$cfg" "$port" "$nbthread"
  for ((i = 0; i < workers; i++)); do
    p=$(free_port)
    "$bin/hello-worker" --listen "127.0.0.1:$p" >>"$log" 2>&1 & extra+=("$!"); started+=("$!")
    wait_ready "$!" "$p" true_check || return 1
    echo "    server w$i 127.0.0.1:$p" >>"$cfg"
  done
  cp "$cfg" "$out/haproxy.cfg"
  haproxy -c -q -f "$cfg" >>"$log" 2>&1 || { exit_code="haproxy -c rejected the config"; return 1; }
  haproxy -db -f "$cfg" >>"$log" 2>&1 & front=$!; started+=("$front")
  wait_ready "$front" "$port" true_check
}

start() { # SETUP
  front='' extra=() exit_code=''
  case $1 in
    direct) start_direct ;;
    herd-node) start_herd_node round-robin auto ;;
    herd-node-handoff) start_herd_node round-robin handoff ;;
    herd-node-shared) start_herd_node shared auto ;;
    herd-kernel) start_herd round-robin kernel ;;
    herd-threads) start_herd round-robin handoff 2 ;;
    herd-*) start_herd "${1#herd-}" ;;
    node-*) start_node "${1#node-}" ;;
    haproxy) start_haproxy ;;
  esac
}

stop() { # the current setup: its front first, then what is left of its workers
  # The front goes first and alone: herd then drains its workers itself, and
  # a Node primary whose workers die before it would fork new ones.
  local rest=() p
  for p in ${front:+"$front"} "${extra[@]}"; do
    alive "$p" && mapfile -t -O "${#rest[@]}" rest < <(descendants "$p")
  done
  rest+=("${extra[@]}")
  [[ -n $front ]] && alive "$front" && stop_pids "$front"
  for p in "${!rest[@]}"; do alive "${rest[$p]}" || unset 'rest[p]'; done
  ((${#rest[@]})) && stop_pids "${rest[@]}"
  # Forget them: a PID stopped now may belong to someone else by the time
  # the exit trap runs.
  started=()
  return 0
}

# ---------------------------------------------------------------- the runs
index="$out/index.tsv"
printf 'round\tsetup\tshape\tstatus\tjson\tfront_rss_kib\ttotal_rss_kib\tworkers_expected\tfront_cpu_ticks\ttotal_cpu_ticks\n' >"$index"
{
  echo "date=$(date -u +%Y-%m-%dT%H:%MZ)"
  echo "command=SETUPS=\"${setups[*]}\" WORKERS=$workers ROUNDS=$rounds DURATION=$duration${SOURCE_RANGE:+ SOURCE_RANGE=$source_range} benches/fronts.sh"
  echo "herd_commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src workers benches || echo '+dirty')"
  echo "cpus=$(nproc) × $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "kernel=$(uname -r)"
  echo "node=$(node --version 2>/dev/null || echo none)"
  echo "node_workers=$node_workers"
  echo "haproxy=$(haproxy -v 2>/dev/null | awk 'NR==1 {print $3}' || echo none)"
  echo "haproxy_nbthread=$nbthread"
  echo "workers=$workers"
  echo "duration=$duration"
  echo "rounds=$rounds"
  echo "source_range=${source_range:-127.0.0.1 only}"
  echo "clk_tck=$(getconf CLK_TCK)"
  echo "load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)"
} >"$out/env.txt"

bench_args() { # SHAPE -> herd bench arguments
  case $1 in
    close-*) echo "-c ${1#close-} --new-connection-per-request" ;;
    keepalive-*) echo "-c ${1#keepalive-}" ;;
  esac
}

for ((round = 1; round <= rounds; round++)); do
  for s in "${setups[@]}"; do
    log="$out/logs/r${round}_$s.log"
    if ! start "$s"; then
      echo "round $round: $s FAILED to start: ${exit_code:-?}; log: $log" >&2
      printf '%s\t%s\t-\t%s\t-\t\t\t\t\t\n' "$round" "$s" "${exit_code:-?}" >>"$index"
      stop
      continue
    fi
    # Warm-up, not recorded: JITs, caches, first-connection costs.
    "$bin/herd" bench "127.0.0.1:$port" -c 10 -d 300ms "${range_args[@]}" >/dev/null
    "$bin/herd" bench "127.0.0.1:$port" -c 10 -d 300ms --new-connection-per-request "${range_args[@]}" >/dev/null
    for shape in "${shapes[@]}"; do
      json="json/r${round}_${s}_$shape.json"
      read -r -a args <<< "$(bench_args "$shape")"
      # Every process that serves: the front, what it forked, the extra PIDs.
      pids=("$front" "${extra[@]}"); mapfile -t -O "${#pids[@]}" pids < <(descendants "$front")
      front_cpu=$(cpu_ticks "$front"); total_cpu=$(cpu_ticks "${pids[@]}")
      status=ok
      "$bin/herd" bench "http://127.0.0.1:$port/" "${args[@]}" -d "$duration" \
        "${range_args[@]}" --json >"$out/$json" 2>>"$log" || status="herd bench exited $?"
      front_cpu=$(($(cpu_ticks "$front") - front_cpu)); total_cpu=$(($(cpu_ticks "${pids[@]}") - total_cpu))
      # RSS right after the load: the front alone, and everything that serves.
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$s" "$shape" "$status" "$json" \
        "$(rss_kib "$front")" "$(rss_kib "${pids[@]}")" "$expect" "$front_cpu" "$total_cpu" >>"$index"
      echo "round $round/$rounds  $s  $shape  $(grep -o '"requests_per_sec": [0-9.]*' "$out/$json" | cut -d' ' -f2 | cut -d. -f1) req/s" >&2
    done
    alive "$front" || echo "round $round: $s died during the load; see $log" >&2
    stop
  done
done
echo "load_at_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/env.txt"

echo "results in $out" >&2
python3 benches/summarise_fronts.py "$out"
