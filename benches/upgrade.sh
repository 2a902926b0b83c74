#!/bin/sh
# benches/upgrade.sh (from the repository root, after `cargo build --release --workspace`):
# a real herd, and `herd bench` against it with no upgrade and with 9 `herd upgrade`s
# during the 5 s load, interleaved twice. Bounded: 4 loads of 5 s.
# Interleaved: the same herd, 5 s loads, with no upgrade and with an upgrade every 0.5 s.
H=./target/release/herd
$H run --listen 127.0.0.1:0 --workers 2 --metrics 127.0.0.1:0 -- ./target/release/hello-worker > /tmp/herd-upgrade-bench.log 2>&1 &
sleep 1
P=$(grep -o 'listening on [0-9.:]*' /tmp/herd-upgrade-bench.log | head -1 | awk '{print $3}')
for round in 1 2; do
  for kind in none upgrades; do
    U=; if [ $kind = upgrades ]; then (for i in 1 2 3 4 5 6 7 8 9; do sleep 0.5; $H upgrade >/dev/null || echo "upgrade failed"; done) & U=$!; fi
    echo "== round $round, $kind"
    $H bench http://$P/ -c 3 -d 5s --new-connection-per-request | grep -E "^(requests|errors|throughput|latency)"
    [ -n "$U" ] && wait $U
  done
done
$H status | head -1; $H status --json | grep -A2 '"upgrades"' | tr -d '\n'; echo
$H stop
