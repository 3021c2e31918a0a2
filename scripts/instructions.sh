#!/usr/bin/env bash
# Instructions per request: how many user-space instructions the load balancer
# executes to proxy one request, counted by valgrind's cachegrind.
#
# The benchmark's CPU times move by several percent between runs of the same
# binary on a shared machine; this count moves by less than 0.2 %, so it shows
# what a change to the data path did to our own code, one build against
# another. It counts user space only: the system calls and the kernel's TCP
# work, most of a proxied request's cost on loopback, are not in it (see
# docs/performance.md, "Measured effect of each data-path change").
#
# Three backends and the load balancer (static discovery over them) run on
# loopback; the load balancer runs under cachegrind, and h2load sends it
# REQUESTS requests over 16 keep-alive connections, one at a time on each. The
# count of a run of WARMUP requests is taken from that of a run of
# WARMUP + REQUESTS, so start-up and shutdown cancel out.
#
# Usage: scripts/instructions.sh [REQUESTS]   (make instructions)
#   env LB_BIN     the load balancer binary to measure (default: a release build
#                  of this tree), e.g. an older build to compare against
#   env PROTOCOL   http1 (default) or h2: what the clients speak
#   env WARMUP     requests of the run that is subtracted (default 2000)
#   env BASE_PORT  ports BASE_PORT to BASE_PORT+13 are used (default 19600)
set -euo pipefail

cd "$(dirname "$0")/.."
REQUESTS=${1:-10000}
WARMUP=${WARMUP:-2000}
PROTOCOL=${PROTOCOL:-http1}
BASE_PORT=${BASE_PORT:-19600}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
die() { echo "instructions: $*" >&2; exit 1; }

# valgrind and h2load from Debian when they are missing.
ensure_tool() { # tool package
  command -v "$1" >/dev/null && return
  command -v apt-get >/dev/null || die "$1 is missing and there is no apt-get; install $2 by hand"
  echo "==> installing $2 (for $1)" >&2
  local sudo=()
  (( EUID == 0 )) || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
ensure_tool valgrind valgrind
ensure_tool h2load nghttp2-client

case "$PROTOCOL" in
  http1) H2LOAD_PROTOCOL=(--h1) ;;
  h2) H2LOAD_PROTOCOL=() ;;
  *) die "PROTOCOL is http1 or h2, not $PROTOCOL" ;;
esac

echo "==> building release binaries" >&2
cargo build --release --quiet -p backend -p loadbalancer
BACKEND_BIN=target/release/backend
LB_BIN=${LB_BIN:-target/release/loadbalancer}

# wait_ready URL: waits up to 20 s (valgrind starts slowly) for a 200.
wait_ready() {
  for _ in $(seq 200); do
    curl -sf -o /dev/null "$1" && return
    sleep 0.1
  done
  die "no answer from $1"
}

backends=()
for i in 1 2 3; do
  port=$((BASE_PORT + 10 + i))
  echo "{\"port\": $port, \"serviceName\": \"instructions\", \"logLevel\": \"warn\"}" \
    >"$WORK/backend$i.json"
  CONFIG_PATH="$WORK/backend$i.json" POD_NAME="backend-$i" POD_IP=127.0.0.1 \
    "$BACKEND_BIN" >"$WORK/backend$i.log" 2>&1 &
  PIDS+=($!)
  backends+=("\"127.0.0.1:$port\"")
  wait_ready "http://127.0.0.1:$port/"
done
LB_PORT=$BASE_PORT
LB_ADMIN=$((BASE_PORT + 9))
cat >"$WORK/lb.json" <<EOF
{"port": $LB_PORT, "adminPort": $LB_ADMIN, "discovery": "static", "logLevel": "warn",
 "backendServiceName": "instructions", "backendPort": $((BASE_PORT + 11)),
 "staticBackends": [$(IFS=,; echo "${backends[*]}")]}
EOF

# instructions REQUESTS: the load balancer's user-space instructions over a run
# of REQUESTS requests, start-up and shutdown included.
instructions() {
  CONFIG_PATH="$WORK/lb.json" valgrind --tool=cachegrind --cache-sim=no \
    --cachegrind-out-file="$WORK/cachegrind.out" "$LB_BIN" >"$WORK/lb.log" 2>&1 &
  local pid=$!
  wait_ready "http://127.0.0.1:$LB_ADMIN/readyz"
  h2load "${H2LOAD_PROTOCOL[@]}" -n "$1" -c 16 -m 1 "http://127.0.0.1:$LB_PORT/" >"$WORK/h2load.log" \
    || die "h2load failed: $(tail -3 "$WORK/h2load.log")"
  grep -q "^requests: .* $1 succeeded, 0 failed" "$WORK/h2load.log" \
    || die "not every request succeeded: $(grep '^requests:' "$WORK/h2load.log")"
  kill -TERM "$pid"
  wait "$pid" || true
  awk '/^summary:/ { print $2 }' "$WORK/cachegrind.out"
}

echo "==> $PROTOCOL: $WARMUP requests, then $((WARMUP + REQUESTS)), through $LB_BIN under cachegrind" >&2
before=$(instructions "$WARMUP")
after=$(instructions $((WARMUP + REQUESTS)))
echo "instructions per request ($PROTOCOL, $REQUESTS requests): $(( (after - before) / REQUESTS ))"
