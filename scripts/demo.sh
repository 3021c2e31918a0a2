#!/usr/bin/env bash
# Local demo of the load balancer, no cluster needed.
#
# Builds both binaries, starts three backends on free local ports (POD_NAME
# backend-1..3, each with its gRPC service too), starts the load balancer in
# static mode over them, sends requests through it with curl and prints how
# many each pod answered; then three WebSocket sessions, and 30 gRPC calls on
# ONE HTTP/2 connection through a load balancer configured for a gRPC-only
# Service, spread over the three pods call by call.
# Everything it started is stopped on exit, including on Ctrl-C.
#
# Usage: scripts/demo.sh [--requests N] [--release]
#   --requests N   how many requests to send (default 30; env REQUESTS)
#   --release      build and run release binaries (default: debug, which builds
#                  much faster and is plenty for a demo; env PROFILE=release)
#   BACKEND_BIN=/path/to/binary   run this instead of target/<profile>/backend
set -euo pipefail

REQUESTS="${REQUESTS:-30}"
PROFILE="${PROFILE:-debug}"

usage() { sed -n '2,15s/^# \{0,1\}//p' "$0"; }
die() { echo "demo: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--requests) [[ $# -ge 2 ]] || die "$1 needs a number"; REQUESTS="$2"; shift 2 ;;
    --release) PROFILE=release; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ "$REQUESTS" =~ ^[1-9][0-9]*$ ]] || die "--requests must be a positive whole number, got '$REQUESTS'"
[[ "$PROFILE" == debug || "$PROFILE" == release ]] || die "PROFILE must be debug or release"
command -v curl >/dev/null || die "curl is required"

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "==> Building ($PROFILE)"
build_flags=()
[[ "$PROFILE" == release ]] && build_flags+=(--release)
if [[ -n "${BACKEND_BIN:-}" ]]; then
  cargo build "${build_flags[@]}" -p loadbalancer
else
  cargo build "${build_flags[@]}" -p loadbalancer -p backend
  BACKEND_BIN="target/$PROFILE/backend"
fi
# The WebSocket and gRPC clients the demo ends with (backend/examples/).
cargo build "${build_flags[@]}" -p backend --example ws_client --example grpc_client
LB_BIN="target/$PROFILE/loadbalancer"
WS_CLIENT="target/$PROFILE/examples/ws_client"
GRPC_CLIENT="target/$PROFILE/examples/grpc_client"
[[ -x "$BACKEND_BIN" ]] || die "no backend binary at $BACKEND_BIN"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/lb-demo.XXXXXX")"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
# Turn Ctrl-C and SIGTERM into a normal exit so the EXIT trap cleans up.
trap 'echo; echo "demo: interrupted, stopping everything"; exit 130' INT TERM

USED_PORTS=" "
# A port that nothing listens on right now: pick at random in a high range,
# skip ports already handed out, and probe with bash's /dev/tcp.
free_port() {
  local port _
  for _ in $(seq 1 200); do
    port=$((20000 + RANDOM % 30000))
    [[ "$USED_PORTS" == *" $port "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      USED_PORTS+="$port "
      echo "$port"
      return 0
    fi
  done
  die "no free local port found"
}

# wait_for URL PID NAME: polls URL until it answers 200, for up to 15 s.
wait_for() {
  local url="$1" pid="$2" name="$3" _
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name.log" >&2; die "$name exited during start-up (log above)"; }
    [[ "$(curl -s -o /dev/null -w '%{http_code}' "$url" || true)" == 200 ]] && return 0
    sleep 0.1
  done
  cat "$WORK/$name.log" >&2
  die "$name did not become ready at $url"
}

# start_loadbalancer NAME ADMIN_PORT: runs the load balancer with $WORK/NAME.json,
# logging to $WORK/NAME.log, and waits until its /readyz on ADMIN_PORT says ready.
start_loadbalancer() {
  local name="$1" admin_port="$2"
  CONFIG_PATH="$WORK/$name.json" "$LB_BIN" >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
  wait_for "http://127.0.0.1:$admin_port/readyz" "$!" "$name"
}

echo "==> Starting three backends"
BACKEND_ADDRS=()
GRPC_ADDRS=()
for i in 1 2 3; do
  port="$(free_port)"
  grpc_port="$(free_port)"
  name="backend-$i"
  printf '{"port": %d, "grpcPort": %d, "serviceName": "backend-service", "logLevel": "warn"}\n' \
    "$port" "$grpc_port" >"$WORK/$name.json"
  POD_NAME="$name" CONFIG_PATH="$WORK/$name.json" "$BACKEND_BIN" >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
  wait_for "http://127.0.0.1:$port/" "$!" "$name"
  BACKEND_ADDRS+=("\"127.0.0.1:$port\"")
  GRPC_ADDRS+=("\"127.0.0.1:$grpc_port\"")
  echo "    $name on 127.0.0.1:$port (gRPC on $grpc_port)"
done

echo "==> Starting the load balancer (static discovery)"
LB_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
cat >"$WORK/loadbalancer.json" <<JSON
{
  "port": $LB_PORT,
  "adminPort": $ADMIN_PORT,
  "backendServiceName": "backend-service",
  "backendPort": 8080,
  "discovery": "static",
  "staticBackends": [$(IFS=,; echo "${BACKEND_ADDRS[*]}")],
  "logLevel": "info"
}
JSON
start_loadbalancer loadbalancer "$ADMIN_PORT"
echo "    proxy on 127.0.0.1:$LB_PORT, admin (/healthz, /readyz) on 127.0.0.1:$ADMIN_PORT"

echo "==> Sending $REQUESTS requests to http://127.0.0.1:$LB_PORT/"
: >"$WORK/answers"
failed=0
for _ in $(seq 1 "$REQUESTS"); do
  status="$(curl -s -o "$WORK/body" -w '%{http_code}' --max-time 10 "http://127.0.0.1:$LB_PORT/" || true)"
  pod="$(sed -n 's/.*"podName"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$WORK/body" 2>/dev/null || true)"
  if [[ "$status" == 200 && -n "$pod" ]]; then
    echo "$pod" >>"$WORK/answers"
  else
    failed=$((failed + 1))
  fi
done

echo
echo "Sample answer: $(cat "$WORK/body" 2>/dev/null || true)"
echo
printf '  %-12s %8s %7s\n' "podName" "requests" "share"
sort "$WORK/answers" | uniq -c | awk -v total="$REQUESTS" \
  '{ printf "  %-12s %8d %6.1f%%\n", $2, $1, 100 * $1 / total }'
[[ "$failed" -eq 0 ]] || printf '  %-12s %8d %6.1f%%\n' "(failed)" "$failed" "$(awk -v f="$failed" -v t="$REQUESTS" 'BEGIN { print 100 * f / t }')"
echo
echo "Last access log line of the load balancer:"
grep 'loadbalancer::access' "$WORK/loadbalancer.log" | tail -n 1 | sed 's/^/  /'
echo
echo "==> Three WebSocket sessions through ws://127.0.0.1:$LB_PORT/ws (each balanced on its own)"
for i in 1 2 3; do
  if ! "$WS_CLIENT" "ws://127.0.0.1:$LB_PORT/ws" "hello $i" 2>&1 | sed 's/^/  /'; then
    failed=$((failed + 1))
  fi
done
echo
# In a cluster one load balancer serves both, its grpcPort reaching every pod's
# gRPC port. Here the pods share one IP, so each has its own gRPC port, and a
# second load balancer does what a user with a gRPC-only Service would run:
# backendProtocol h2c over the gRPC addresses, and the gRPC health check.
echo "==> A load balancer for the backends' gRPC ports (backendProtocol h2c)"
GRPC_LB_PORT="$(free_port)"
GRPC_ADMIN_PORT="$(free_port)"
cat >"$WORK/loadbalancer-grpc.json" <<JSON
{
  "port": $GRPC_LB_PORT,
  "adminPort": $GRPC_ADMIN_PORT,
  "backendServiceName": "backend-service",
  "backendPort": 9000,
  "backendProtocol": "h2c",
  "discovery": "static",
  "staticBackends": [$(IFS=,; echo "${GRPC_ADDRS[*]}")],
  "healthCheck": {"grpcService": ""},
  "logLevel": "warn"
}
JSON
start_loadbalancer loadbalancer-grpc "$GRPC_ADMIN_PORT"
echo "==> 30 gRPC calls on ONE HTTP/2 connection to 127.0.0.1:$GRPC_LB_PORT (each balanced on its own)"
if ! "$GRPC_CLIENT" --addr "http://127.0.0.1:$GRPC_LB_PORT" --calls 30 --health 2>&1; then
  failed=$((failed + 1))
fi
echo
echo "==> Stopping everything"
[[ "$failed" -eq 0 ]] || exit 1
