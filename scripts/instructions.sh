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
# REQUESTS requests over 16 keep-alive connections, one at a time on each (hey,
# for a new connection per request). The count of a run of WARMUP requests is
# taken from that of a run of WARMUP + REQUESTS, so start-up and shutdown
# cancel out.
#
# Usage: scripts/instructions.sh [REQUESTS]   (make instructions)
#   env LB_BIN     the load balancer binary to measure (default: a release build
#                  of this tree), e.g. an older build to compare against
#   env PEER       count nginx or HAProxy instead, configured as the benchmark
#                  runs them (bench/): nginx or haproxy (like-for-like), or
#                  nginx-plain or haproxy-plain (http1 and churn only). In one
#                  process each (nginx with `master_process off`, HAProxy with
#                  one thread), because valgrind follows no fork; the count is
#                  that of all threads either way.
#   env PROTOCOL   what the clients speak: http1 (default), churn (HTTP/1.1,
#                  each request on a new connection with `Connection: close`,
#                  as the benchmark's churn scenario), h2 (h2c with prior
#                  knowledge, HTTP/1.1 to the backends), or grpc (unary calls of
#                  identity.v1.Identity/Get, HTTP/2 to the backends' gRPC ports)
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
say() { echo "==> $*" >&2; }

# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
# valgrind, and the load generator, from Debian when they are missing.
ensure_tool valgrind valgrind
if [[ $PROTOCOL == churn ]]; then ensure_tool hey hey; else ensure_tool h2load nghttp2-client; fi

# An empty GetRequest: a gRPC frame of no message bytes.
printf '\0\0\0\0\0' >"$WORK/grpc-body.bin"
TARGET_PATH=/
GRPC_PATH=/identity.v1.Identity/Get
BACKEND_PROTOCOL=http1
case "$PROTOCOL" in
  http1 | churn) H2LOAD_ARGS=(--h1) ;;
  h2) H2LOAD_ARGS=() ;;
  grpc)
    H2LOAD_ARGS=(-d "$WORK/grpc-body.bin" -H 'content-type: application/grpc' -H 'te: trailers')
    TARGET_PATH=$GRPC_PATH
    BACKEND_PROTOCOL=h2c
    ;;
  *) die "PROTOCOL is http1, churn, h2 or grpc, not $PROTOCOL" ;;
esac
PEER=${PEER:-}
case "$PEER" in
  "" | nginx | haproxy) ;;
  nginx-plain | haproxy-plain)
    [[ $PROTOCOL == http1 || $PROTOCOL == churn ]] || die "PEER=$PEER has no $PROTOCOL listener"
    ;;
  *) die "PEER is nginx, haproxy, nginx-plain or haproxy-plain, not $PEER" ;;
esac
[[ -z $PEER ]] || ensure_tool "${PEER%-plain}" "${PEER%-plain}"

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
  grpc_port=$((port + 10))
  echo "{\"port\": $port, \"grpcPort\": $grpc_port, \"serviceName\": \"instructions\", \"logLevel\": \"warn\"}" \
    >"$WORK/backend$i.json"
  CONFIG_PATH="$WORK/backend$i.json" POD_NAME="backend-$i" POD_IP=127.0.0.1 \
    "$BACKEND_BIN" >"$WORK/backend$i.log" 2>&1 &
  PIDS+=($!)
  wait_ready "http://127.0.0.1:$port/"
  if [[ $BACKEND_PROTOCOL == h2c ]]; then port=$grpc_port; fi
  backends+=("\"127.0.0.1:$port\"")
done
LB_PORT=$BASE_PORT
LB_ADMIN=$((BASE_PORT + 9))
cat >"$WORK/lb.json" <<EOF
{"port": $LB_PORT, "adminPort": $LB_ADMIN, "discovery": "static", "logLevel": "warn",
 "backendProtocol": "$BACKEND_PROTOCOL",
 "backendServiceName": "instructions", "backendPort": $((BASE_PORT + 11)),
 "staticBackends": [$(IFS=,; echo "${backends[*]}")]}
EOF

# A peer's configuration, from the benchmark's templates with their
# placeholders filled in; h2 and grpc listen on a port of their own
# (PEER_PORT), as in the benchmark. TARGET_PORT is where the load goes.
PEER_PORT=$((BASE_PORT + 1))
TARGET_PORT=$LB_PORT
if [[ -n $PEER ]]; then
  [[ $PROTOCOL == h2 || $PROTOCOL == grpc ]] && TARGET_PORT=$PEER_PORT
  mkdir -p "$WORK/nginx-tmp" "$WORK/nginx-plain-tmp"
  # What `fill` puts in: one thread, and the load's 16 connections, one
  # request at a time on each.
  CORES=1 MAXCONN=1000 H2_CONNECTIONS=16 H2_STREAMS=1
  BACKEND_PORTS=($((BASE_PORT + 11)) $((BASE_PORT + 12)) $((BASE_PORT + 13)))
  GRPC_ADDRS=()
  for port in $((BASE_PORT + 21)) $((BASE_PORT + 22)) $((BASE_PORT + 23)); do
    GRPC_ADDRS+=("127.0.0.1:$port")
  done
  # peer_config TEMPLATE: filled in, nginx in one process.
  peer_config() {
    fill "$1" PORT="$LB_PORT" H2_PORT="$PEER_PORT" GRPC_PORT="$PEER_PORT" \
      | sed 's|^worker_processes auto;|worker_processes 1;\nmaster_process off;|'
  }
  case "$PEER" in
    nginx*)
      peer_config "bench/$PEER.conf" >"$WORK/$PEER.conf"
      # bench/nginx.conf includes these from the run's directory.
      [[ $PROTOCOL == h2 || $PROTOCOL == grpc ]] \
        && peer_config "bench/nginx-$PROTOCOL.conf" >"$WORK/nginx-$PROTOCOL.conf"
      PEER_COMMAND=(nginx -p "$WORK" -e "$WORK/peer-error.log" -c "$WORK/$PEER.conf")
      ;;
    haproxy*)
      peer_config "bench/$PEER.cfg" >"$WORK/$PEER.cfg"
      PEER_COMMAND=(haproxy -db -f "$WORK/$PEER.cfg")
      if [[ $PROTOCOL == h2 || $PROTOCOL == grpc ]]; then
        peer_config "bench/haproxy-$PROTOCOL.cfg" >"$WORK/haproxy-$PROTOCOL.cfg"
        PEER_COMMAND+=(-f "$WORK/haproxy-$PROTOCOL.cfg")
      fi
      ;;
  esac
fi

# load REQUESTS: sends REQUESTS requests to the target and checks that each was
# answered with a 200.
load() {
  if [[ $PROTOCOL == churn ]]; then
    # Go's client, keep-alive off, sends `Connection: close` and dials anew.
    hey -n "$1" -c 16 -disable-keepalive "http://127.0.0.1:$TARGET_PORT$TARGET_PATH" >"$WORK/load.log" \
      || die "hey failed: $(tail -3 "$WORK/load.log")"
    grep -Eq "^[[:space:]]*\[200\][[:space:]]+$1 responses" "$WORK/load.log" \
      || die "not every request was answered 200: $(grep -A3 'Status code' "$WORK/load.log")"
  else
    h2load "${H2LOAD_ARGS[@]}" -n "$1" -c 16 -m 1 "http://127.0.0.1:$TARGET_PORT$TARGET_PATH" >"$WORK/load.log" \
      || die "h2load failed: $(tail -3 "$WORK/load.log")"
    grep -q "^requests: .* $1 succeeded, 0 failed" "$WORK/load.log" \
      || die "not every request succeeded: $(grep '^requests:' "$WORK/load.log")"
  fi
}

# instructions REQUESTS: the target's user-space instructions over a run of
# REQUESTS requests, start-up and shutdown included.
instructions() {
  local pid stop
  local cachegrind=(valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file="$WORK/cachegrind.out")
  if [[ -n $PEER ]]; then
    "${cachegrind[@]}" "${PEER_COMMAND[@]}" >"$WORK/peer.log" 2>&1 &
    pid=$!
    wait_ready "http://127.0.0.1:$LB_PORT/"
    # A graceful stop for each: nginx's QUIT, HAProxy's soft stop.
    stop=QUIT
    [[ $PEER == haproxy* ]] && stop=USR1
  else
    CONFIG_PATH="$WORK/lb.json" "${cachegrind[@]}" "$LB_BIN" >"$WORK/lb.log" 2>&1 &
    pid=$!
    wait_ready "http://127.0.0.1:$LB_ADMIN/readyz"
    stop=TERM
  fi
  # h2load counts every HTTP 200 a success, and a failed gRPC call is one too.
  if [[ $PROTOCOL == grpc ]]; then
    local why
    why="$(grpc_probe "http://127.0.0.1:$TARGET_PORT")"
    [[ -z $why ]] || die "through ${PEER:-the load balancer}, $why"
  fi
  load "$1"
  kill "-$stop" "$pid"
  wait "$pid" || true
  awk '/^summary:/ { print $2 }' "$WORK/cachegrind.out"
}

echo "==> $PROTOCOL: $WARMUP requests, then $((WARMUP + REQUESTS)), through ${PEER:-$LB_BIN} under cachegrind" >&2
before=$(instructions "$WARMUP")
after=$(instructions $((WARMUP + REQUESTS)))
echo "instructions per request (${PEER:+$PEER, }$PROTOCOL, $REQUESTS requests): $(( (after - before) / REQUESTS ))"
