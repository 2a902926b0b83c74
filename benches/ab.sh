#!/usr/bin/env bash
# Two herd builds (or one build with two configs) side by side: does a
# change cost anything on the hand-off path?
#
#   A=/path/to/old/herd B=target/release/herd benches/ab.sh
#   A=target/release/herd B=target/release/herd B_CONFIG=some.toml benches/ab.sh
#
# Each variant runs herd round-robin with $WORKERS hello-workers on
# 127.0.0.1, warms up for 300 ms, then `herd bench` opens a new connection
# per request for $DURATION at 1 and at 50 concurrent clients. Rounds are
# interleaved and each round shuffles the order, so drift on this shared
# 2-core machine (and the TIME_WAIT sockets a run leaves) hits both alike.
# Prints every run, then the medians and B/A.
#
# Env: A, B (herd binaries; default target/release/herd for both), A_CONFIG,
#      B_CONFIG (optional -c files), WORKERS (2), ROUNDS (5), DURATION (3s).
# Loopback only; every load is bounded by DURATION and every wait by a
# deadline; only the PIDs this script starts are signalled.
set -euo pipefail
cd "$(dirname "$0")/.."

a=${A:-target/release/herd}
b=${B:-target/release/herd}
workers=${WORKERS:-2}
rounds=${ROUNDS:-5}
duration=${DURATION:-3s}
worker=target/release/hello-worker
bench=target/release/herd
for bin in "$a" "$b" "$worker" "$bench"; do
  [[ -x $bin ]] || { echo "ab.sh: $bin is not built (cargo build --release)" >&2; exit 2; }
done
a=$(realpath "$a") b=$(realpath "$b") worker=$(realpath "$worker")
out=$(mktemp /tmp/herd-ab.XXXXXX)

run() { # VARIANT HERD CONFIG
  local variant=$1 herd=$2 config=$3 dir pid port
  dir=$(mktemp -d /tmp/herd-ab-run.XXXXXX)
  local args=(run --listen 127.0.0.1:0 --workers "$workers" --control "$dir/herd.sock")
  [[ -n $config ]] && args+=(-c "$(realpath "$config")")
  (cd "$dir" && exec env RUST_LOG=info "$herd" "${args[@]}" -- "$worker" >"$dir/log" 2>&1) &
  pid=$!
  for _ in $(seq 200); do
    grep -q "worker ready slot=$((workers - 1))" "$dir/log" 2>/dev/null && break
    sleep 0.05
  done
  port=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$dir/log" | head -1 | cut -d: -f2)
  if [[ -z $port ]]; then
    echo "ab.sh: $variant did not start:" >&2
    cat "$dir/log" >&2
    kill -TERM "$pid" 2>/dev/null || true
    exit 1
  fi
  "$bench" bench "127.0.0.1:$port" -c 10 -d 300ms --new-connection-per-request >/dev/null
  for clients in 1 50; do
    local rate
    rate=$("$bench" bench "127.0.0.1:$port" -c "$clients" -d "$duration" --new-connection-per-request --json |
      python3 -c 'import json, sys; print(round(json.load(sys.stdin)["requests_per_sec"]))')
    echo "$variant $clients $rate" | tee -a "$out"
  done
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
}

for round in $(seq "$rounds"); do
  echo "round $round"
  for variant in $(printf 'A\nB\n' | shuf); do
    if [[ $variant == A ]]; then run A "$a" "${A_CONFIG:-}"; else run B "$b" "${B_CONFIG:-}"; fi
  done
done

python3 - "$out" <<'EOF'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    variant, clients, rate = line.split()
    runs[(variant, int(clients))].append(int(rate))
print("| clients | A conn/s (median) | B conn/s (median) | B/A |")
print("|---|---|---|---|")
for clients in (1, 50):
    a, b = statistics.median(runs[("A", clients)]), statistics.median(runs[("B", clients)])
    print(f"| {clients} | {a:.0f} | {b:.0f} | {b / a:.2f} |")
EOF
rm -f "$out"
