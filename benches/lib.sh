# Shared by the benchmark scripts (sourced after they cd to the project
# root, with `script` set to their name for messages): finding, waiting for
# and stopping the processes a script started, by PID and parent PID only
# (never by name), a free loopback port, durations and CPU lists.
# shellcheck shell=bash

alive() { # PID -> true while it exists and is not a zombie
  # One read of the state: a zombie can be reaped (by bash) between two reads,
  # and a vanished file must count as gone.
  local state
  state=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null || true)
  [[ -n $state && $state != Z && $state != X ]]
}
descendants() { # PID -> its children, grandchildren, ... (by parent PID, never by name)
  local child
  for child in $(pgrep -P "$1" || true); do echo "$child"; descendants "$child"; done
}
stop_pids() { # PIDs...: SIGTERM, up to 10 s to go, then SIGKILL what is left
  local p deadline=$((SECONDS + 10))
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "$@"; do
    while alive "$p" && ((SECONDS < deadline)); do sleep 0.05; done
    if alive "$p"; then echo "$script: pid $p ignored SIGTERM for 10 s; SIGKILL" >&2; kill -KILL "$p" 2>/dev/null || true; fi
  done
  for p in "$@"; do wait "$p" 2>/dev/null || true; done # reap our own children; others are not ours to wait for
}
stop_started() { # the exit trap: every PID in $started still alive, with its descendants; then $tmp
  local p all=()
  for p in "${started[@]}"; do alive "$p" && all+=("$p") && mapfile -t -O "${#all[@]}" all < <(descendants "$p"); done
  ((${#all[@]})) && stop_pids "${all[@]}"
  rm -rf "${tmp:-}"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_exit() { # SECONDS PIDS...: wait for PIDS to exit, at most SECONDS; false if any outlived it
  local limit=$1 p deadline; shift
  deadline=$((SECONDS + limit))
  for p in "$@"; do
    while alive "$p" && ((SECONDS < deadline)); do sleep 0.05; done
    alive "$p" && return 1
    wait "$p" 2>/dev/null || true
  done
  return 0
}
dur_secs() { # "3s" / "500ms" / "1m" -> whole seconds, rounded up
  python3 -c 'import math, re, sys
m = re.fullmatch(r"([0-9.]+)(ms|s|m)", sys.argv[1]) or sys.exit("bad duration " + sys.argv[1])
print(math.ceil(float(m[1]) * {"ms": 0.001, "s": 1, "m": 60}[m[2]]))' "$1"
}
expand_cpus() { # "0-3,8" -> "0 1 2 3 8"
  local part a b
  local IFS=,
  for part in $1; do
    if [[ $part == *-* ]]; then a=${part%-*} b=${part#*-}; seq "$a" "$b"; else echo "$part"; fi
  done | tr '\n' ' '
}
answers() { # PORT (with $bin/herd) -> true if one HTTP request gets a 2xx answer within 1 s
  "$bin/herd" bench "127.0.0.1:$1" -n 1 -c 1 --timeout 1s --json 2>/dev/null | grep -q '"succeeded": 1,'
}
haproxy_head() { # CFG PORT NBTHREAD: HAProxy's config up to its backend's servers (tcp, round-robin, on 127.0.0.1:PORT)
  cat >"$1" <<EOF
global
    nbthread $3
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:$2
    default_backend be
backend be
    balance roundrobin
EOF
}
