#!/usr/bin/env bash
# End-to-end: wrk against hello-worker with no front, and behind herd.
# Runs are interleaved (A B C, A B C, ...) so drift on this shared machine hits
# every setup alike; prints the median of each. Loopback only; every run is
# bounded by -d. Usage: benches/e2e.sh [ROUNDS] [SECONDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; secs=${2:-5}; conns=${3:-50}
cargo build --release --workspace -q
bin=target/release
pids=()
tmp=$(mktemp -d)
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

declare -A port pid_of
port[direct]=$(free_port); "$bin/hello-worker" --listen 127.0.0.1:${port[direct]} & pids+=($!); pid_of[direct]=$!
port[herd-1]=$(free_port); RUST_LOG=warn "$bin/herd" run -c /dev/null --control "$tmp/1.sock" --listen 127.0.0.1:${port[herd-1]} --workers 1 -- "$bin/hello-worker" & pids+=($!); pid_of[herd-1]=$!
port[herd-1-metrics]=$(free_port); RUST_LOG=warn "$bin/herd" run -c /dev/null --control "$tmp/m.sock" --metrics 127.0.0.1:0 --listen 127.0.0.1:${port[herd-1-metrics]} --workers 1 -- "$bin/hello-worker" & pids+=($!); pid_of[herd-1-metrics]=$!
port[herd-1-again]=$(free_port); RUST_LOG=warn "$bin/herd" run -c /dev/null --control "$tmp/1b.sock" --listen 127.0.0.1:${port[herd-1-again]} --workers 1 -- "$bin/hello-worker" & pids+=($!); pid_of[herd-1-again]=$!
port[herd-2]=$(free_port); RUST_LOG=warn "$bin/herd" run -c /dev/null --control "$tmp/2.sock" --listen 127.0.0.1:${port[herd-2]} --workers 2 -- "$bin/hello-worker" & pids+=($!); pid_of[herd-2]=$!
# SETUPS="herd-1 herd-1-metrics" benches/e2e.sh ... compares just those (the first is the baseline).
read -r -a setups <<< "${SETUPS:-direct herd-1 herd-1-metrics herd-2}"
for s in "${setups[@]}"; do wait_port "${port[$s]}"; done

declare -A results
run() { # setup, extra wrk args -> requests/s
  wrk -t1 -c"$conns" -d"${secs}s" "${@:2}" "http://127.0.0.1:${port[$1]}/" | awk '/Requests\/sec/ {print $2}'
}
latency() { # setup -> "p50 p99" in microseconds, one connection, new connection per request
  wrk -t1 -c1 -d"${secs}s" --latency -H 'Connection: close' "http://127.0.0.1:${port[$1]}/" |
    awk 'function us(v) { if (v ~ /us$/) return v+0; if (v ~ /ms$/) return v*1000; return v*1000000 }
         $1=="50%" {p50=us($2)} $1=="99%" {p99=us($2)} END {print p50, p99}'
}
for r in $(seq "$rounds"); do
  for s in "${setups[@]}"; do
    results[$s,close]+="$(run "$s" -H 'Connection: close') "
    results[$s,keepalive]+="$(run "$s") "
    read -r p50 p99 < <(latency "$s")
    results[$s,p50]+="$p50 "; results[$s,p99]+="$p99 "
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
base_close=$(echo "${results[${setups[0]},close]}" | median)
base_ka=$(echo "${results[${setups[0]},keepalive]}" | median)
echo "| setup | new conn/request, $conns conns (req/s) | ratio | keep-alive, $conns conns (req/s) | ratio | 1 conn, new conn/request: p50 / p99 (µs) | primary RSS (KiB) |"
echo "|---|---|---|---|---|---|---|"
for s in "${setups[@]}"; do
  c=$(echo "${results[$s,close]}" | median); k=$(echo "${results[$s,keepalive]}" | median)
  p50=$(echo "${results[$s,p50]}" | median); p99=$(echo "${results[$s,p99]}" | median)
  rss=$(ps -o rss= -p "${pid_of[$s]}" | tr -d ' ')
  printf "| %s | %.0f | %.2f | %.0f | %.2f | %s / %s | %s |\n" "$s" "$c" "$(echo "$c/$base_close" | bc -l)" "$k" "$(echo "$k/$base_ka" | bc -l)" "$p50" "$p99" "$rss"
done
