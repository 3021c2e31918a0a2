#!/usr/bin/env bash
# Benchmark: our load balancer against nginx and HAProxy on this machine, in one run.
#
# Starts three backends on loopback, then measures with wrk (keep-alive clients,
# over HTTPS for tls), for WebSockets with wsload (backend/examples/wsload.rs),
# for HTTP/2 and gRPC with h2load (Debian's nghttp2-client), against:
#   direct   one backend, no proxy: the ceiling
#   ours     our load balancer, static discovery over the three
#   nginx    round-robin over the three, upstream keep-alive  (bench/nginx.conf)
#   haproxy  round-robin over the three, http-reuse always    (bench/haproxy.cfg)
# nginx and HAProxy do the same header work as ours (X-Forwarded-*, a request id
# both ways): like-for-like. throughput and churn also measure them as users run
# them, with no header additions and upstream keep-alive as before:
#   nginx-plain    bench/nginx-plain.conf
#   haproxy-plain  bench/haproxy-plain.cfg
# Targets run interleaved in rounds (direct ours nginx haproxy, then ours nginx
# haproxy direct, ...: each round starts one target further on) so drift in the
# machine's load hits all of them alike, and no target always runs first or
# after the same one. Prints one table per scenario and writes the same to
# docs/bench-results.md.
#
# Scenarios (--scenario a,b,...; env SCENARIO; default throughput,slow,bigbody):
#   throughput  GET /, small JSON answers: proxy overhead per request
#   churn       GET / like throughput, with `Connection: close`: a new client
#               connection per request (upstream keep-alive as before); ROUNDS
#               rounds like throughput
#   slow        GET /work?sleep_ms=50 over 1000 connections: many requests in flight
#   bigbody     GET /work?bytes=1048576: 1 MiB responses, streaming throughput
#   soak        ours only, 60 s: VmRSS at start, middle and end (should stay flat)
#   idle        IDLE_CONNECTIONS (6000) keep-alive client connections opened to
#               each of ours, nginx and HAProxy, one GET / on each, then held
#               quiet (bench/idle.py, python3): VmRSS before and after, and the
#               difference per idle connection. Mind the open-file limit: the
#               script raises it to 2 × IDLE_CONNECTIONS + 1024 (HAProxy takes
#               two descriptors per connection)
#   idle-tls    the same over HTTPS (the tls scenario's listeners and
#               certificate): each connection a TLS handshake and one GET /,
#               then quiet, so each proxy also holds the connection's TLS state
#   algorithms  ours with round_robin against ours with least_request, over two
#               backends and one that answers SLOW_BACKEND_MS (20) late: p99
#   policy      the cost of traffic policy, GET / over CONNECTIONS keep-alive
#               connections, ROUNDS rounds interleaved like throughput, wrk
#               sending a different X-User on every request to every target
#               (bench/policy.lua): ours three times, ours-rr (round_robin),
#               ours-affinity (consistent_hash on the X-User header) and
#               ours-ratelimit (round_robin behind a global and a perClient
#               sourceIp rateLimit of 10,000,000 requests/s: checked on every
#               request, never refusing); nginx and HAProxy set up as a user
#               would for the same two (bench/nginx-policy.conf,
#               bench/haproxy-policy.cfg: nginx-affinity, nginx-ratelimit,
#               haproxy-affinity, haproxy-ratelimit), each against its plain
#               configuration as round-robin baseline (nginx-rr, haproxy-rr:
#               bench/nginx-plain.conf, bench/haproxy-plain.cfg, which the
#               policy files copy but for the policy). Each policy's requests/s
#               and p99 as a ratio of the same proxy's round-robin run; a 429
#               counts as an error, so a limit that binds shows
#   websocket   WebSocket echo on /ws over WS_CONNECTIONS (64) connections, each
#               sending a WS_BYTES (32) binary message and awaiting its echo in
#               a closed loop: messages/s and round-trip percentiles once the
#               tunnels are open (nginx and HAProxy set up for WebSocket as in
#               their docs, see the two files); ROUNDS rounds like throughput
#   tls         HTTPS, direct left out (the backends speak plain HTTP): all three
#               proxies terminate TLS with one ECDSA P-256 certificate that the
#               script makes with openssl (nginx and HAProxy set up for HTTPS as
#               a user would: bench/nginx-tls.conf, bench/haproxy-tls.cfg); two
#               measurements, ROUNDS rounds each: `tls`, GET / over keep-alive
#               TLS connections like throughput, and `tls-handshake`, the same
#               with `Connection: close`, so that every request opens a new TLS
#               connection (handshakes/s; wrk reuses each connection's last
#               session, so these are mostly resumed handshakes, see
#               docs/performance.md)
#   h2          cleartext HTTP/2 with prior knowledge (h2c) from the clients,
#               h2load with H2_CONNECTIONS (16) connections of H2_STREAMS (16)
#               concurrent streams each, GET /, HTTP/1.1 to the backends as in
#               throughput; ours on its main port, nginx on a `listen ... http2`
#               port, HAProxy on a `bind ... proto h2` one (bench/nginx-h2.conf,
#               bench/haproxy-h2.cfg); direct left out (the backends speak
#               HTTP/1.1 only)
#   grpc        gRPC unary calls, identity.v1.Identity/Get with an empty
#               GetRequest (a 5-byte gRPC frame, content-type application/grpc),
#               h2load as in h2, to the backends' gRPC ports (the backend's
#               `grpcPort`, or the h2c gRPC servers named in GRPC_BACKENDS);
#               ours is a second instance whose main port sends to those ports
#               with `"backendProtocol": "h2c"`, nginx uses `grpc_pass`, HAProxy
#               `server ... proto h2` (bench/nginx-grpc.conf,
#               bench/haproxy-grpc.cfg)
#   For h2 and grpc each target is first tried with one curl request (for grpc
#   also its grpc-status trailer must be 0); a target that fails it, or whose
#   load generator fails, is reported under the table and the run goes on.
#   p50/p99/p99.9 come from h2load's per-request log (--log-file), since h2load
#   prints no percentiles. The spread column is the share of the run's requests
#   each of the three backends served, from their /metrics before and after each
#   run (`backend_requests_total{path="/"}`, for grpc
#   `backend_grpc_requests_total{method="Get"}`), marked even when each share is
#   within 5 % of a third (31.7 to 35.0 %), which their targets line adds.
#   scale       ours alone, no load generator: discovery of 10,000 endpoints in
#               100 EndpointSlices from the tests' fake API server, 300 slice
#               updates (loadbalancer/examples/scale.rs): CPU per update, time
#               until the balancer sees it, cost of a pick, health-check CPU at
#               rest, RSS, with the targets of issue 20 marked met or not;
#               SCALE_SLICES, SCALE_ENDPOINTS (per slice), SCALE_UPDATES,
#               SCALE_HEALTH_SECONDS (20) change it; about a minute
#
# Usage: scripts/bench.sh [options]       (make bench passes the env variables)
#   --scenario LIST     see above                               (env SCENARIO)
#   --duration S        seconds per measured run (default 5)    (env DURATION)
#   --rounds N          rounds of throughput and websocket runs (default 3;
#                       slow and bigbody 1)                     (env ROUNDS)
#   --connections N     wrk connections for throughput (default 64)
#                       slow uses SLOW_CONNECTIONS (1000), bigbody BIG_CONNECTIONS
#                       (16), websocket WS_CONNECTIONS (64) and WS_BYTES (32),
#                       soak SOAK_DURATION (60)                 (env CONNECTIONS)
#   --threads N         wrk, wsload and h2load threads (default 2) (env WRK_THREADS)
#   env H2_CONNECTIONS, H2_STREAMS  h2 and grpc: h2load connections (16) and
#                       concurrent streams on each (16)
#   env GRPC_BACKENDS   grpc: three h2c gRPC servers as HOST:PORT,HOST:PORT,
#                       HOST:PORT on this machine to use in place of the
#                       backend's gRPC ports (they must serve
#                       identity.v1.Identity/Get); their spread and CPU are not
#                       counted, as they are not the script's backends
#   env BASELINE_BIN    throughput, churn and idle: a second build of the load balancer
#                       (say, the one before a change), measured as `baseline`
#                       in the same rounds as ours
#   --skip-build        use the release binaries already built  (env SKIP_BUILD=1);
#                       they are looked for in $CARGO_TARGET_DIR (default target/)
#   --no-write          print only; leave docs/bench-results.md alone (env NO_WRITE=1)
#
# Aggregation: requests/s (messages/s for websocket) is the sum of requests over
# the sum of run time across rounds; latency percentiles are the median of the
# rounds' percentiles; errors and CPU ticks are summed. CPU is utime+stime from
# /proc/<pid>/stat of every process of the target (nginx: master and workers),
# sampled before and after each run. RSS is each proxy's VmRSS (summed over its
# processes) half-way through its run, the highest of the rounds. A second table
# splits each target's CPU per request into the proxy's user and kernel time, the
# backends', the rest (the load generator, interrupts) and the machine's in all
# (/proc/stat).
# Targets: every scenario's table ends with a line setting ours against the
# better of nginx and HAProxy on each measure (the peer with more requests/s,
# the one with the lower p99, the one with less proxy CPU per request), each
# marked met or not: at or above 1.00× on requests/s, at or below on p99 and CPU;
# then our errors (met at zero) and RSS against the leanest peer's. throughput and
# churn print it twice: against the like-for-like peers (at or above) and the
# plain ones (within 3 %: at or above 0.97×, at or below 1.03×). algorithms sets
# least_request against round_robin; policy each policy of ours against ours-rr
# (within 3 %, and no errors); soak checks errors and a flat RSS. With more than
# one round, each ratio is followed by its spread: the lowest and highest of the
# same ratio within one round (ours and that peer a few seconds apart).
# The load generator shares the machine's cores with everything else, equally in
# every target. Our access log is at `info`, so logLevel `warn` switches it off,
# like `access_log off` in nginx and no `log` line in HAProxy.
set -euo pipefail

SCENARIO="${SCENARIO:-throughput,slow,bigbody}"
DURATION="${DURATION:-5}"
ROUNDS="${ROUNDS:-3}"
CONNECTIONS="${CONNECTIONS:-64}"
SLOW_CONNECTIONS="${SLOW_CONNECTIONS:-1000}"
SLOW_SLEEP_MS="${SLOW_SLEEP_MS:-50}"
BIG_CONNECTIONS="${BIG_CONNECTIONS:-16}"
BIG_BYTES="${BIG_BYTES:-1048576}"
WS_CONNECTIONS="${WS_CONNECTIONS:-64}"
WS_BYTES="${WS_BYTES:-32}"
SOAK_DURATION="${SOAK_DURATION:-60}"
IDLE_CONNECTIONS="${IDLE_CONNECTIONS:-6000}"
SLOW_BACKEND_MS="${SLOW_BACKEND_MS:-20}"
WRK_THREADS="${WRK_THREADS:-2}"
H2_CONNECTIONS="${H2_CONNECTIONS:-16}"
H2_STREAMS="${H2_STREAMS:-16}"
GRPC_BACKENDS="${GRPC_BACKENDS:-}"
BASELINE_BIN="${BASELINE_BIN:-}"
SKIP_BUILD="${SKIP_BUILD:-0}"
NO_WRITE="${NO_WRITE:-0}"

usage() { sed -n '2,/^set /s/^# \{0,1\}//p' "$0"; }
die() { echo "bench: $*" >&2; exit 1; }
say() { echo "==> $*" >&2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --scenario) SCENARIO="${2:?--scenario needs a list}"; shift 2 ;;
    --duration) DURATION="${2:?--duration needs seconds}"; shift 2 ;;
    --rounds) ROUNDS="${2:?--rounds needs a number}"; shift 2 ;;
    --connections) CONNECTIONS="${2:?--connections needs a number}"; shift 2 ;;
    --threads) WRK_THREADS="${2:?--threads needs a number}"; shift 2 ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --no-write) NO_WRITE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
for var in DURATION ROUNDS CONNECTIONS SLOW_CONNECTIONS SLOW_SLEEP_MS BIG_CONNECTIONS \
  BIG_BYTES WS_CONNECTIONS WS_BYTES SOAK_DURATION WRK_THREADS H2_CONNECTIONS H2_STREAMS IDLE_CONNECTIONS; do
  [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || die "$var must be a positive whole number, got '${!var}'"
done
(( SOAK_DURATION >= 10 )) || die "SOAK_DURATION must be at least 10 (seconds)"
# The backend's echo takes messages up to 16 MiB (MAX_MESSAGE_BYTES).
(( WS_BYTES <= 16777216 )) || die "WS_BYTES must be at most 16777216 (the backend's message limit)"
IFS=, read -r -a SCENARIOS <<<"$SCENARIO"
for s in "${SCENARIOS[@]}"; do
  [[ "$s" =~ ^(throughput|churn|slow|bigbody|soak|algorithms|policy|websocket|tls|h2|grpc|idle|idle-tls|scale)$ ]] || die "unknown scenario '$s'"
done
# Which load generators the chosen scenarios need: wsload for websocket, h2load
# for h2 and grpc, wrk for every other; tls needs a certificate and HTTPS
# listeners besides, h2 and grpc HTTP/2 listeners, grpc gRPC servers.
NEED_WRK=0
NEED_WSLOAD=0
NEED_TLS=0
NEED_H2LOAD=0
NEED_H2=0
NEED_GRPC=0
NEED_PLAIN=0
NEED_IDLE=0
for s in "${SCENARIOS[@]}"; do
  case "$s" in
    websocket) NEED_WSLOAD=1 ;;
    h2) NEED_H2LOAD=1; NEED_H2=1 ;;
    grpc) NEED_H2LOAD=1; NEED_GRPC=1 ;;
    idle | idle-tls) NEED_IDLE=1 ;;
    *) NEED_WRK=1 ;;
  esac
  [[ "$s" == tls || "$s" == idle-tls ]] && NEED_TLS=1
  # throughput and churn measure nginx and HAProxy in both configurations;
  # policy takes the plain one as their round-robin baseline.
  [[ "$s" == throughput || "$s" == churn || "$s" == policy ]] && NEED_PLAIN=1
done
GRPC_ADDRS=()
if [[ -n "$GRPC_BACKENDS" ]]; then
  IFS=, read -r -a GRPC_ADDRS <<<"$GRPC_BACKENDS"
  (( ${#GRPC_ADDRS[@]} == 3 )) || die "GRPC_BACKENDS must name three HOST:PORT, got '$GRPC_BACKENDS'"
  for a in "${GRPC_ADDRS[@]}"; do
    [[ "$a" =~ ^127\.[0-9]+\.[0-9]+\.[0-9]+:[1-9][0-9]*$ ]] ||
      die "GRPC_BACKENDS: '$a' is not HOST:PORT on loopback (127.x.x.x)"
  done
fi
# The gRPC method every grpc call asks for, and the frame of its empty request.
GRPC_PATH=/identity.v1.Identity/Get

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
PATH="$PATH:/usr/sbin:/sbin"
COMMAND="SCENARIO=$SCENARIO DURATION=$DURATION ROUNDS=$ROUNDS CONNECTIONS=$CONNECTIONS"
COMMAND+=" SLOW_CONNECTIONS=$SLOW_CONNECTIONS BIG_CONNECTIONS=$BIG_CONNECTIONS"
(( NEED_WSLOAD )) && COMMAND+=" WS_CONNECTIONS=$WS_CONNECTIONS WS_BYTES=$WS_BYTES"
(( NEED_H2LOAD )) && COMMAND+=" H2_CONNECTIONS=$H2_CONNECTIONS H2_STREAMS=$H2_STREAMS"
[[ -n "$GRPC_BACKENDS" ]] && COMMAND+=" GRPC_BACKENDS=$GRPC_BACKENDS"
COMMAND+=" WRK_THREADS=$WRK_THREADS scripts/bench.sh"

# --- tools -------------------------------------------------------------------

# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
(( NEED_WRK )) && ensure_tool wrk wrk
(( NEED_H2LOAD )) && ensure_tool h2load nghttp2-client
ensure_tool nginx nginx-light nginx
ensure_tool haproxy haproxy
(( NEED_TLS )) && ensure_tool openssl openssl
command -v curl >/dev/null || die "curl is required"
if (( NEED_IDLE )); then command -v python3 >/dev/null || die "python3 is required for idle (bench/idle.py)"; fi

if [[ "$SKIP_BUILD" != 1 ]]; then
  say "building release binaries (lto = fat, codegen-units = 1: the first build is slow)"
  cargo build --release --locked -p backend -p loadbalancer
  if (( NEED_WSLOAD )); then
    say "building the WebSocket load generator (backend/examples/wsload.rs)"
    cargo build --release --locked -p backend --example wsload
  fi
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BACKEND_BIN="$TARGET_DIR/release/backend"
LB_BIN="$TARGET_DIR/release/loadbalancer"
WSLOAD_BIN="$TARGET_DIR/release/examples/wsload"
[[ -x "$BACKEND_BIN" && -x "$LB_BIN" ]] || die "release binaries missing in $TARGET_DIR; run without --skip-build"
if (( NEED_WSLOAD )); then
  [[ -x "$WSLOAD_BIN" ]] || die "$WSLOAD_BIN missing; run without --skip-build"
fi

# 1000 client connections plus as many upstream ones per proxy need descriptors.
NEED_FDS=$((4 * SLOW_CONNECTIONS + 1024))
# idle: the client holds IDLE_CONNECTIONS, HAProxy two descriptors for each.
if (( NEED_IDLE && 2 * IDLE_CONNECTIONS + 1024 > NEED_FDS )); then NEED_FDS=$((2 * IDLE_CONNECTIONS + 1024)); fi
if (( $(ulimit -n) < NEED_FDS )); then
  ulimit -n "$NEED_FDS" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fi
(( $(ulimit -n) >= NEED_FDS )) || die "open-file limit $(ulimit -n) is below $NEED_FDS; raise it (ulimit -n)"
say "open-file limit: $(ulimit -n)"
# HAProxy wants two descriptors per connection and refuses to start without them.
MAXCONN=$(( $(ulimit -n) / 2 - 64 ))
(( MAXCONN <= 10000 )) || MAXCONN=10000

CORES="$(nproc)"
CLK_TCK="$(getconf CLK_TCK)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/lb-bench.XXXXXX")"
# nginx workers may run as an unprivileged user and must reach their temp dirs.
chmod 755 "$WORK"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo; echo "bench: interrupted, stopping everything" >&2; exit 130' INT TERM

# tls: one self-signed ECDSA P-256 certificate for 127.0.0.1 and localhost, valid
# a day, shared by the three proxies (HAProxy wants certificate and key in one file).
if (( NEED_TLS )); then
  say "making an ECDSA P-256 certificate with openssl"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -addext basicConstraints=critical,CA:FALSE \
    -keyout "$WORK/tls.key" -out "$WORK/tls.crt" >"$WORK/openssl.log" 2>&1 ||
    { cat "$WORK/openssl.log" >&2; die "openssl could not make the certificate"; }
  cat "$WORK/tls.crt" "$WORK/tls.key" >"$WORK/tls.pem"
  chmod 644 "$WORK/tls.key" "$WORK/tls.pem"
fi

# --- processes ---------------------------------------------------------------

# Below the kernel's ephemeral range (32768 and up), so that no outgoing
# connection, ours or another program's, can be holding the port we pick.
NEXT_PORT=$((12000 + RANDOM % 18000))
# port VAR: sets VAR to the next port from NEXT_PORT on with no listener on
# 127.0.0.1. (Not `$(port)`: a subshell could not advance NEXT_PORT.)
port() {
  while (exec 3<>"/dev/tcp/127.0.0.1/$NEXT_PORT") 2>/dev/null; do
    NEXT_PORT=$((NEXT_PORT + 1))
  done
  printf -v "$1" '%d' "$NEXT_PORT"
  NEXT_PORT=$((NEXT_PORT + 1))
}
# The variables port sets by name, declared for shellcheck, which cannot follow
# printf -v.
p=0 tp=0 hp=0 gp=0 admin=0

# wait_200 URL PID: up to 15 s for URL to answer 200 while PID lives; returns 1
# if PID exits first, 2 if the time runs out.
wait_200() {
  local url="$1" pid="$2" _
  for _ in $(seq 150); do
    kill -0 "$pid" 2>/dev/null || return 1
    # -k: the tls scenario's certificate is self-signed.
    [[ "$(curl -sk -o /dev/null -w '%{http_code}' "$url" || true)" == 200 ]] && return
    sleep 0.1
  done
  return 2
}

# await_200 URL PID LOG: wait_200, and on failure the log and the end of the run.
await_200() {
  local rc=0
  wait_200 "$1" "$2" || rc=$?
  (( rc == 0 )) && return
  cat "$3" >&2
  (( rc == 1 )) && die "process for $1 exited (log above)"
  die "$1 did not answer 200"
}

# h2_probe URL: one GET / over h2c with prior knowledge; prints why it failed, or
# nothing when the answer was 200.
h2_probe() {
  local code rc=0
  code="$(curl -sS --http2-prior-knowledge --max-time 5 -o /dev/null -w '%{http_code}' "$1/" \
    2>"$WORK/curl.err")" || rc=$?
  if (( rc )); then
    echo "GET / over h2c failed: $(last_line "$WORK/curl.err")"
  elif [[ "$code" != 200 ]]; then
    echo "GET / over h2c answered $code"
  fi
}

# The 5-byte gRPC frame of an empty message (GetRequest): not compressed, length 0.
printf '\0\0\0\0\0' >"$WORK/grpc-body.bin"

# Why the grpc scenario cannot run, when it cannot (the run goes on without it).
GRPC_SKIP=""
# grpc: the backends serve gRPC on a port of their own (`grpcPort`), unless
# GRPC_BACKENDS names other servers.
BACKEND_GRPC=0
(( NEED_GRPC )) && (( ${#GRPC_ADDRS[@]} == 0 )) && BACKEND_GRPC=1

# start_backend NAME PORT GRPC_PORT: one backend (GRPC_PORT 0: no gRPC listener),
# its pid in STARTED_PID; returns wait_200's status for its GET /.
start_backend() {
  local grpc=""
  (( $3 )) && grpc=", \"grpcPort\": $3"
  printf '{"port": %d, "serviceName": "bench", "logLevel": "warn"%s}\n' "$2" "$grpc" >"$WORK/$1.json"
  POD_NAME="$1" POD_IP=127.0.0.1 CONFIG_PATH="$WORK/$1.json" "$BACKEND_BIN" >"$WORK/$1.log" 2>&1 &
  PIDS+=("$!")
  STARTED_PID="$!"
  wait_200 "http://127.0.0.1:$2/" "$STARTED_PID"
}

say "starting three backends (logLevel warn$( (( BACKEND_GRPC )) && echo ", each with a gRPC port"))"
BACKEND_PORTS=()
BACKEND_PIDS=()
for i in 1 2 3; do
  port p
  gp=0
  (( BACKEND_GRPC )) && port gp
  if ! start_backend "backend-$i" "$p" "$gp"; then
    # A backend without the gRPC service rejects the key it does not know; the
    # other scenarios can still run.
    if (( gp )) && grep -q grpcPort "$WORK/backend-$i.log"; then
      GRPC_SKIP="the backend does not take grpcPort (no gRPC service in this build: $(last_line "$WORK/backend-$i.log")); GRPC_BACKENDS can name other h2c gRPC servers"
      say "grpc: $GRPC_SKIP"
      BACKEND_GRPC=0
      GRPC_ADDRS=()
      kill "$STARTED_PID" 2>/dev/null || true
      gp=0
      start_backend "backend-$i" "$p" 0 || { cat "$WORK/backend-$i.log" >&2; die "backend-$i did not start (log above)"; }
    else
      cat "$WORK/backend-$i.log" >&2
      die "backend-$i did not start (log above)"
    fi
  fi
  BACKEND_PORTS+=("$p")
  BACKEND_PIDS+=("$STARTED_PID")
  (( gp )) && GRPC_ADDRS+=("127.0.0.1:$gp")
done

# The gRPC servers must answer a call before any proxy is put in front of them;
# the backend's gRPC listener may come up a moment after its HTTP one.
if (( NEED_GRPC )) && [[ -z "$GRPC_SKIP" ]]; then
  for a in "${GRPC_ADDRS[@]}"; do
    for _ in $(seq 50); do
      why="$(grpc_probe "http://$a")"
      [[ -z "$why" ]] && break
      sleep 0.1
    done
    if [[ -n "$why" ]]; then
      GRPC_SKIP="the gRPC server at $a does not serve $GRPC_PATH: $why"
      say "grpc: $GRPC_SKIP"
      break
    fi
  done
  [[ -z "$GRPC_SKIP" ]] && say "grpc: servers at ${GRPC_ADDRS[*]} answer $GRPC_PATH"
fi
(( NEED_GRPC )) && [[ -n "$GRPC_SKIP" ]] && NEED_GRPC=0

# URL: plain HTTP; TLS_URL: the same target over HTTPS (tls scenario only).
declare -A URL PID TLS_URL
URL[direct]="http://127.0.0.1:${BACKEND_PORTS[0]}"
PID[direct]="${PIDS[0]}"

say "starting our load balancer (static discovery, logLevel warn, one runtime worker per core)"
port p
port admin
# tls: an HTTPS listener beside the plain one, as docs/configuration.md sets it up.
tls_section=""
if (( NEED_TLS )); then
  port tp
  tls_section="\"tls\": {\"port\": $tp, \"certFile\": \"$WORK/tls.crt\", \"keyFile\": \"$WORK/tls.key\"},"
  TLS_URL[ours]="https://127.0.0.1:$tp"
fi
cat >"$WORK/loadbalancer.json" <<JSON
{
  "port": $p,
  "adminPort": $admin,
  "backendServiceName": "bench",
  "backendPort": ${BACKEND_PORTS[0]},
  "discovery": "static",
  "staticBackends": ["127.0.0.1:${BACKEND_PORTS[0]}", "127.0.0.1:${BACKEND_PORTS[1]}", "127.0.0.1:${BACKEND_PORTS[2]}"],
  $tls_section
  "logLevel": "warn"
}
JSON
CONFIG_PATH="$WORK/loadbalancer.json" "$LB_BIN" >"$WORK/ours.log" 2>&1 &
PIDS+=("$!")
PID[ours]="$!"
URL[ours]="http://127.0.0.1:$p"
await_200 "http://127.0.0.1:$admin/readyz" "${PID[ours]}" "$WORK/ours.log"
(( NEED_TLS )) && await_200 "${TLS_URL[ours]}/" "${PID[ours]}" "$WORK/ours.log"
# h2: the same port; HTTP/1.1 and h2c with prior knowledge are told apart by
# the connection's first bytes.
URL[h2:ours]="${URL[ours]}"

# BASELINE_BIN: another build of the load balancer (the one before a change),
# run with the same configuration on ports of its own as target `baseline`,
# beside ours in throughput and churn: before and after in one interleaved run.
if [[ -n "$BASELINE_BIN" ]]; then
  [[ -x "$BASELINE_BIN" ]] || die "BASELINE_BIN: $BASELINE_BIN is not an executable"
  say "starting the baseline load balancer ($BASELINE_BIN)"
  port p
  port admin
  sed -e "s|\"port\": [0-9]*,|\"port\": $p,|" -e "s|\"adminPort\": [0-9]*,|\"adminPort\": $admin,|" \
    -e '/"tls":/d' "$WORK/loadbalancer.json" >"$WORK/baseline.json"
  CONFIG_PATH="$WORK/baseline.json" "$BASELINE_BIN" >"$WORK/baseline.log" 2>&1 &
  PIDS+=("$!")
  PID[baseline]="$!"
  URL[baseline]="http://127.0.0.1:$p"
  await_200 "http://127.0.0.1:$admin/readyz" "${PID[baseline]}" "$WORK/baseline.log"
fi

# Why a target of the h2 or grpc scenario was not measured ("SCENARIO:TARGET").
declare -A UNAVAILABLE

# grpc: a second instance of ours, as a user serving only gRPC would set it up:
# its main port, and the gRPC servers as static backends spoken to over h2c,
# health-checked with grpc.health.v1.
# A build that does not know the keys exits at once; the grpc scenario then
# goes on with nginx and HAProxy and says why ours is missing.
if (( NEED_GRPC )); then
  say "starting a second load balancer for grpc (backendProtocol h2c to the gRPC ports)"
  port p
  port admin
  cat >"$WORK/ours-grpc.json" <<JSON
{
  "port": $p,
  "adminPort": $admin,
  "backendServiceName": "bench",
  "backendPort": ${GRPC_ADDRS[0]##*:},
  "backendProtocol": "h2c",
  "discovery": "static",
  "staticBackends": ["${GRPC_ADDRS[0]}", "${GRPC_ADDRS[1]}", "${GRPC_ADDRS[2]}"],
  "healthCheck": {"grpcService": ""},
  "logLevel": "warn"
}
JSON
  CONFIG_PATH="$WORK/ours-grpc.json" "$LB_BIN" >"$WORK/ours-grpc.log" 2>&1 &
  PIDS+=("$!")
  PID[grpc:ours]="$!"
  URL[grpc:ours]="http://127.0.0.1:$p"
  rc=0
  wait_200 "http://127.0.0.1:$admin/readyz" "${PID[grpc:ours]}" || rc=$?
  if (( rc == 1 )); then
    UNAVAILABLE[grpc:ours]="did not start: $(last_line "$WORK/ours-grpc.log")"
    say "grpc: ours ${UNAVAILABLE[grpc:ours]}"
  elif (( rc == 2 )); then
    # Not fatal: the probe before the scenario says whether calls get through.
    say "grpc: ours did not report ready on /readyz within 15 s"
  fi
fi

if [[ "${SCENARIOS[*]}" != soak ]]; then
  say "starting nginx (worker_processes auto) and HAProxy (nbthread $CORES)"
  port p
  mkdir -m 777 "$WORK/nginx-tmp"
  fill bench/nginx.conf PORT="$p" >"$WORK/nginx.conf"
  if (( NEED_TLS )); then
    # nginx.conf includes $WORK/nginx-tls*.conf: the HTTPS server.
    port tp
    fill bench/nginx-tls.conf TLS_PORT="$tp" >"$WORK/nginx-tls.conf"
    TLS_URL[nginx]="https://127.0.0.1:$tp"
  fi
  # h2 and grpc: servers of their own, nginx.conf includes them the same way.
  if (( NEED_H2 )); then
    port hp
    fill bench/nginx-h2.conf H2_PORT="$hp" >"$WORK/nginx-h2.conf"
    URL[h2:nginx]="http://127.0.0.1:$hp"
  fi
  if (( NEED_GRPC )); then
    port gp
    fill bench/nginx-grpc.conf GRPC_PORT="$gp" >"$WORK/nginx-grpc.conf"
    URL[grpc:nginx]="http://127.0.0.1:$gp"
  fi
  nginx -p "$WORK" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf" >"$WORK/nginx.log" 2>&1 &
  PIDS+=("$!")
  PID[nginx]="$!"
  URL[nginx]="http://127.0.0.1:$p"
  await_200 "${URL[nginx]}/" "${PID[nginx]}" "$WORK/nginx-error.log"
  (( NEED_TLS )) && await_200 "${TLS_URL[nginx]}/" "${PID[nginx]}" "$WORK/nginx-error.log"

  port p
  haproxy_files=(-f "$WORK/haproxy.cfg")
  fill bench/haproxy.cfg PORT="$p" >"$WORK/haproxy.cfg"
  if (( NEED_TLS )); then
    # The HTTPS frontend, a second configuration file.
    port tp
    fill bench/haproxy-tls.cfg TLS_PORT="$tp" >"$WORK/haproxy-tls.cfg"
    haproxy_files+=(-f "$WORK/haproxy-tls.cfg")
    TLS_URL[haproxy]="https://127.0.0.1:$tp"
  fi
  if (( NEED_H2 )); then
    port hp
    fill bench/haproxy-h2.cfg H2_PORT="$hp" >"$WORK/haproxy-h2.cfg"
    haproxy_files+=(-f "$WORK/haproxy-h2.cfg")
    URL[h2:haproxy]="http://127.0.0.1:$hp"
  fi
  if (( NEED_GRPC )); then
    port gp
    fill bench/haproxy-grpc.cfg GRPC_PORT="$gp" >"$WORK/haproxy-grpc.cfg"
    haproxy_files+=(-f "$WORK/haproxy-grpc.cfg")
    URL[grpc:haproxy]="http://127.0.0.1:$gp"
  fi
  haproxy -db "${haproxy_files[@]}" >"$WORK/haproxy.log" 2>&1 &
  PIDS+=("$!")
  PID[haproxy]="$!"
  URL[haproxy]="http://127.0.0.1:$p"
  await_200 "${URL[haproxy]}/" "${PID[haproxy]}" "$WORK/haproxy.log"
  (( NEED_TLS )) && await_200 "${TLS_URL[haproxy]}/" "${PID[haproxy]}" "$WORK/haproxy.log"
fi

# throughput, churn and policy: nginx and HAProxy a second time each, in their
# plain configuration (bench/nginx-plain.conf, bench/haproxy-plain.cfg).
if (( NEED_PLAIN )); then
  say "starting nginx and HAProxy in their plain configuration (no header additions)"
  port p
  mkdir -m 777 "$WORK/nginx-plain-tmp"
  fill bench/nginx-plain.conf PORT="$p" >"$WORK/nginx-plain.conf"
  nginx -p "$WORK" -e "$WORK/nginx-plain-error.log" -c "$WORK/nginx-plain.conf" >"$WORK/nginx-plain.log" 2>&1 &
  PIDS+=("$!")
  PID[nginx-plain]="$!"
  URL[nginx-plain]="http://127.0.0.1:$p"
  await_200 "${URL[nginx-plain]}/" "${PID[nginx-plain]}" "$WORK/nginx-plain-error.log"
  port p
  fill bench/haproxy-plain.cfg PORT="$p" >"$WORK/haproxy-plain.cfg"
  haproxy -db -f "$WORK/haproxy-plain.cfg" >"$WORK/haproxy-plain.log" 2>&1 &
  PIDS+=("$!")
  PID[haproxy-plain]="$!"
  URL[haproxy-plain]="http://127.0.0.1:$p"
  await_200 "${URL[haproxy-plain]}/" "${PID[haproxy-plain]}" "$WORK/haproxy-plain.log"
fi

# --- measuring ---------------------------------------------------------------

# cpu_ticks PID...: "utime stime" of the given processes and their children (nginx
# workers), in clock ticks. /proc/<pid>/stat already sums all of a process's threads.
cpu_ticks() {
  local main pid user=0 sys=0 fields
  for main in "$@"; do
    for pid in "$main" $(pgrep -P "$main" || true); do
      # Field 2 (comm) may contain spaces: cut through its closing parenthesis;
      # utime and stime are then the 12th and 13th fields.
      fields="$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null)" || continue
      read -r user sys < <(awk -v u="$user" -v s="$sys" '{ print u + $12, s + $13 }' <<<"$fields")
    done
  done
  echo "$user $sys"
}

# machine_ticks: busy time of all CPUs (user, nice, system, irq, softirq) from
# /proc/stat, in clock ticks; idle, iowait and time stolen by a hypervisor left out.
machine_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }

# status_kib PID FIELD: a VmRSS / VmHWM line of /proc/PID/status, in KiB.
status_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }

# rss_kib PID: VmRSS of the process and its children (nginx workers) summed, in
# KiB. Pages the processes share (nginx's code) count once per process, so
# nginx's figure is an upper bound.
rss_kib() {
  local main="$1" pid total=0 kib
  for pid in "$main" $(pgrep -P "$main" || true); do
    kib="$(status_kib "$pid" VmRSS 2>/dev/null)" || continue
    total=$((total + ${kib:-0}))
  done
  echo "$total"
}

# pid_of SCENARIO TARGET, url_of SCENARIO TARGET: the target's process and base
# URL in the scenario; h2 and grpc have listeners of their own (and grpc a
# second instance of ours), named "SCENARIO:TARGET" in PID and URL.
pid_of() { echo "${PID[$1:$2]:-${PID[$2]}}"; }
url_of() { echo "${URL[$1:$2]:-${URL[$2]}}"; }

# h2_scenario SCENARIO: whether it is one that h2load drives.
h2_scenario() { [[ "$1" == h2 || "$1" == grpc ]]; }

# h2load_run SCENARIO URL CONNECTIONS SECONDS PATH: h2load over h2c with prior
# knowledge, H2_STREAMS streams per connection (grpc: POSTs of the empty
# request's frame as application/grpc), then one line "H2LOAD key=value ...":
# requests (answers with a 2xx status), duration_us, bytes, errors (h2load's
# failed requests, which take in network errors, time-outs and 4xx/5xx, and
# 3xx), and p50_us, p99_us, p999_us from the per-request log. Fails when h2load
# printed no summary.
h2load_run() {
  local scenario="$1" url="$2" conns="$3" secs="$4" path="$5" rc=0 extra=()
  local threads="$WRK_THREADS"
  (( threads <= conns )) || threads="$conns"
  [[ "$scenario" == grpc ]] &&
    extra=(-d "$WORK/grpc-body.bin" -H 'content-type: application/grpc' -H 'te: trailers')
  rm -f "$WORK/h2load.tsv"
  h2load -t "$threads" -c "$conns" -m "$H2_STREAMS" -D "$secs" "${extra[@]}" \
    --log-file="$WORK/h2load.tsv" "$url$path" >"$WORK/h2load.out" 2>&1 || rc=$?
  cat "$WORK/h2load.out"
  grep -q '^requests: ' "$WORK/h2load.out" || { echo "h2load exited with $rc and no summary"; return 1; }
  # Durations (µs) of the requests answered with a 2xx status, in order.
  awk -F'\t' '$2 >= 200 && $2 < 300 { print $3 }' "$WORK/h2load.tsv" 2>/dev/null | sort -n >"$WORK/h2load.sorted"
  awk -v sorted="$WORK/h2load.sorted" '
    function pct(p,    i) { i = int(n * p / 100); if (i < n * p / 100) i++; return n ? d[i < 1 ? 1 : i] : 0 }
    /^finished in / { secs = $3; sub(/s,$/, "", secs); if ($3 ~ /ms,$/) secs /= 1000 }
    /^requests: / { failed = $10 }
    /^status codes: / { ok = $3; redirect = $5 }
    /^traffic: / { bytes = $3; gsub(/[()]/, "", bytes) }
    END {
      while ((getline line < sorted) > 0) d[++n] = line
      printf "H2LOAD requests=%d duration_us=%d bytes=%d errors=%d p50_us=%d p99_us=%d p999_us=%d\n",
        ok, secs * 1e6, bytes, failed + redirect, pct(50), pct(99), pct(99.9)
    }' "$WORK/h2load.out"
}

# generate SCENARIO TARGET CONNECTIONS SECONDS PATH: the scenario's load against
# TARGET, in the foreground, ending with one line of "key=value ..." (wrk's begins
# with `BENCH `, see bench/report.lua; h2load's with `H2LOAD `). wsload
# (backend/examples/wsload.rs) drives the websocket scenario, h2load h2 and grpc,
# wrk every other; churn sends `Connection: close`, so that every request comes
# on a new client connection; tls and tls-handshake go to the
# target's HTTPS port, tls-handshake with `Connection: close`, so that the proxy
# closes each connection after one answer and wrk opens a new one (a new TLS
# handshake) for the next request. policy sends an X-User header that changes
# with every request (bench/policy.lua), to every one of its targets.
generate() {
  local scenario="$1" target="$2" conns="$3" secs="$4" path="$5"
  if h2_scenario "$scenario"; then
    h2load_run "$scenario" "$(url_of "$scenario" "$target")" "$conns" "$secs" "$path"
  elif [[ "$scenario" == websocket ]]; then
    "$WSLOAD_BIN" --url "ws://${URL[$target]#http://}$path" --connections "$conns" \
      --duration "$secs" --size "$WS_BYTES" --threads "$WRK_THREADS"
  elif [[ "$scenario" == tls ]]; then
    wrk -t "$WRK_THREADS" -c "$conns" -d "${secs}s" --timeout 10s -s bench/report.lua \
      "${TLS_URL[$target]}$path"
  elif [[ "$scenario" == tls-handshake ]]; then
    wrk -t "$WRK_THREADS" -c "$conns" -d "${secs}s" --timeout 10s -s bench/report.lua \
      -H 'Connection: close' "${TLS_URL[$target]}$path"
  elif [[ "$scenario" == policy ]]; then
    wrk -t "$WRK_THREADS" -c "$conns" -d "${secs}s" --timeout 10s -s bench/policy.lua \
      "${URL[$target]}$path"
  elif [[ "$scenario" == churn ]]; then
    wrk -t "$WRK_THREADS" -c "$conns" -d "${secs}s" --timeout 10s -s bench/report.lua \
      -H 'Connection: close' "${URL[$target]}$path"
  else
    wrk -t "$WRK_THREADS" -c "$conns" -d "${secs}s" --timeout 10s -s bench/report.lua \
      "${URL[$target]}$path"
  fi
}

# served SCENARIO: what each of the three backends has served so far, from its
# /metrics, as "N1 N2 N3 FAILED": h2 counts `backend_requests_total{path="/"}`,
# grpc `backend_grpc_requests_total{method="Get"}` (FAILED: the calls among them
# whose status was not OK). Prints nothing where the backends cannot tell (the
# gRPC servers of GRPC_BACKENDS are not the script's backends) or a scrape fails.
served() {
  local port text counts=() failed=0 n f
  [[ "$1" == grpc && "$BACKEND_GRPC" != 1 ]] && return
  for port in "${BACKEND_PORTS[@]}"; do
    text="$(curl -sf --max-time 5 "http://127.0.0.1:$port/metrics")" || return 0
    if [[ "$1" == grpc ]]; then
      read -r n f < <(awk '/^backend_grpc_requests_total\{/ && /method="Get"/ {
          n += $NF; if ($0 !~ /code="OK"/) f += $NF }
        END { print n + 0, f + 0 }' <<<"$text")
      failed=$((failed + f))
    else
      n="$(awk '/^backend_requests_total\{/ && /path="\/"[,}]/ { n += $NF } END { print n + 0 }' <<<"$text")"
    fi
    counts+=("$n")
  done
  echo "${counts[*]} $failed"
}

# measure SCENARIO TARGET ROUND CONNECTIONS SECONDS PATH: one run of the load
# generator; appends "TARGET key=value ..." to $WORK/SCENARIO.raw. Each proxy's RSS
# (and our open descriptors) is also sampled half-way through, while the load is on.
# h2 and grpc also record what each backend served in the run (served=N1,N2,N3,
# and grpc_failed), and a failed run there is noted in $WORK/SCENARIO.notes and
# left out rather than ending the whole benchmark.
measure() {
  local scenario="$1" target="$2" round="$3" conns="$4" secs="$5" path="$6"
  local load_pid line mid="" pid spread="" before=() after=()
  local user0 sys0 user1 sys1 backends0 backends1 machine0 machine1
  pid="$(pid_of "$scenario" "$target")"
  # Direct has no proxy process: its own backend is counted under backends.
  local proxy_pids=()
  [[ "$target" != direct ]] && proxy_pids=("$pid")
  if h2_scenario "$scenario"; then read -r -a before < <(served "$scenario") || true; fi
  read -r user0 sys0 < <(cpu_ticks "${proxy_pids[@]}")
  read -r backends0 < <(cpu_ticks "${BACKEND_PIDS[@]}" | awk '{ print $1 + $2 }')
  machine0="$(machine_ticks)"
  generate "$scenario" "$target" "$conns" "$secs" "$path" >"$WORK/load.out" 2>&1 &
  load_pid=$!
  if [[ "$target" != direct ]]; then
    sleep "$(awk -v s="$secs" 'BEGIN { print s / 2 }')"
    mid="rss_mid_kib=$(rss_kib "$pid")"
    [[ "$target" == ours ]] && mid+=" fds_mid=$(find "/proc/$pid/fd" -mindepth 1 | wc -l)"
  fi
  if ! wait "$load_pid"; then
    cat "$WORK/load.out" >&2
    h2_scenario "$scenario" || die "the load generator failed against $target"
    echo "- $target, round $round: h2load failed: $(last_line "$WORK/load.out")" >>"$WORK/$scenario.notes"
    say "$target, round $round: h2load failed, left out (the run goes on)"
    return 0
  fi
  machine1="$(machine_ticks)"
  read -r user1 sys1 < <(cpu_ticks "${proxy_pids[@]}")
  read -r backends1 < <(cpu_ticks "${BACKEND_PIDS[@]}" | awk '{ print $1 + $2 }')
  if h2_scenario "$scenario"; then
    read -r -a after < <(served "$scenario") || true
    if (( ${#before[@]} == 4 && ${#after[@]} == 4 )); then
      spread="served=$((after[0] - before[0])),$((after[1] - before[1])),$((after[2] - before[2]))"
      spread+=" grpc_failed=$((after[3] - before[3]))"
    fi
  fi
  line="$(grep -E '^(BENCH |H2LOAD |messages=)' "$WORK/load.out")" ||
    { cat "$WORK/load.out" >&2; die "no report from the load generator"; }
  line="${line#BENCH }"
  line="${line#H2LOAD }"
  echo "$target round=$round user_ticks=$((user1 - user0)) sys_ticks=$((sys1 - sys0))" \
    "backend_ticks=$((backends1 - backends0)) machine_ticks=$((machine1 - machine0))" \
    "$line $mid $spread" >>"$WORK/$scenario.raw"
  # wrk and h2load report requests and duration_us, wsload messages and seconds.
  printf '    round %d %-8s %s\n' "$round" "$target" \
    "$(awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
              if ("messages" in v) printf "%.0f msg/s", v["messages"] / v["seconds"]
              else printf "%.0f req/s", v["requests"] / (v["duration_us"] / 1e6)
              printf ", p99 %.2f ms", v["p99_us"] / 1000
              if (v["errors"] > 0) printf ", %d errors", v["errors"] }' <<<"$line")" >&2
}

# table SCENARIO: the markdown table for the scenario's raw lines. Counts are
# requests, for websocket round-trip messages, for tls-handshake handshakes (one
# request each), for grpc calls; wrk and h2load report requests and duration_us,
# wsload messages and seconds. h2 and grpc add the spread over the backends;
# every scenario ends with its targets line (targets_line), throughput and churn
# with two, against the like-for-like and the plain peers; policy with a table
# of each proxy's policies against its round-robin run and a targets line of its
# own (policy_lines). A target whose runs all failed shows no latency or CPU.
table() {
  local unit=request
  [[ "$1" == websocket ]] && unit=message
  [[ "$1" == tls-handshake ]] && unit=handshake
  [[ "$1" == grpc ]] && unit=call
  # Whom the targets line sets against whom: ours against nginx and HAProxy,
  # in throughput and churn also against their plain configurations; in
  # algorithms least_request against round_robin.
  local me=ours peers="nginx haproxy" plain_peers=""
  [[ "$1" == throughput || "$1" == churn ]] && plain_peers="nginx-plain haproxy-plain"
  [[ "$1" == algorithms ]] && { me=least_request; peers=round_robin; }
  awk -v tck="$CLK_TCK" -v cores="$CORES" -v unit="$unit" -v scenario="$1" -v me="$me" \
    -v peers="$peers" -v plain_peers="$plain_peers" '
    function busy(t) { return 100 * machine[t] / tck / (us[t] / 1e6) / cores }
    # The shares of the three backends, "34.1/33.0/32.9 %", and whether each is
    # within 5 % of a third; "-" where the backends could not be read.
    function spread(t,    n) {
      n = s1[t] + s2[t] + s3[t]
      if (counted[t] < rounds[t] || n == 0) { even[t] = -1; return "-" }
      even[t] = within(s1[t] / n) && within(s2[t] / n) && within(s3[t] / n)
      return sprintf("%.1f/%.1f/%.1f %% %s", 100 * s1[t] / n, 100 * s2[t] / n, 100 * s3[t] / n, even[t] ? "even" : "uneven")
    }
    function within(share,    d) { d = share - 1 / 3; return (d < 0 ? -d : d) <= 0.05 / 3 }
    function ratio(a, b) { return b ? a / b : 0 }
    function met(ok) { return ok ? "met" : "not met" }
    # policy: for each proxy P, the rows P-affinity and P-ratelimit against
    # P-rr (ours-rr; for nginx and HAProxy their plain configuration), run in
    # the same rounds: requests/s and the median p99 as ratios of round
    # robin'"'"'s, in a table, then the targets line for ours: each policy within
    # TOLERANCE of round robin (at or above 1 - TOLERANCE on requests/s, at or
    # below 1 + TOLERANCE on p99), and no errors in any of the three rows (a 429
    # is an error, so a limit that binds shows).
    function policy_cell(t, rr) {
      if (!req[t] || !req[rr]) return "- | -"
      return sprintf("%.2f× | %.2f×", ratio(rps[t], rps[rr]), ratio(median(p99[t]), median(p99[rr])))
    }
    function policy_target(label, t, rr, tol,    r, q) {
      if (!req[t] || !req[rr]) return sprintf("%s not checked, %s or %s answered nothing", label, t, rr)
      r = ratio(rps[t], rps[rr]); q = ratio(median(p99[t]), median(p99[rr]))
      return sprintf("%s %.2f× round robin on %ss/s, p99 %.2f×: %s (within %d %%)", label, r, unit, q,
        met(r >= 1 - tol && q <= 1 + tol), tol * 100)
    }
    function policy_lines(tol,    n, a, i, x, e) {
      printf "\nEach policy against the same proxy in round robin (nginx-rr and haproxy-rr: their plain configurations), same rounds: %ss/s and p99 as ratios of the round-robin run.\n\n", unit
      print "| proxy | round robin " short "/s | round robin p99 ms | affinity " short "/s | affinity p99 | rate limit " short "/s | rate limit p99 | errors (all three) |"
      print "|---|--:|--:|--:|--:|--:|--:|--:|"
      n = split("ours nginx haproxy", a, " ")
      for (i = 1; i <= n; i++) {
        x = a[i]
        if (!((x "-rr") in seen)) continue
        printf "| %s | %s | %s | %s | %s | %d |\n", x,
          req[x "-rr"] ? sprintf("%.0f", rps[x "-rr"]) : "-",
          req[x "-rr"] ? sprintf("%.2f", median(p99[x "-rr"]) / 1000) : "-",
          policy_cell(x "-affinity", x "-rr"), policy_cell(x "-ratelimit", x "-rr"),
          err[x "-rr"] + err[x "-affinity"] + err[x "-ratelimit"]
      }
      e = err["ours-rr"] + err["ours-affinity"] + err["ours-ratelimit"]
      printf "\nTargets: %s; %s; errors %d, %s. (ours-affinity and ours-ratelimit against ours-rr: at or above %.2f× on %ss/s, at or below %.2f× on p99; errors in the three, a 429 among them, met at zero.)\n",
        policy_target("affinity", "ours-affinity", "ours-rr", tol),
        policy_target("rate limit", "ours-ratelimit", "ours-rr", tol), e, met(e == 0), 1 - tol, unit, 1 + tol
    }
    # round_spread(MEASURE, A, B): ", rounds X–Y×", the lowest and highest
    # ratio of A to B on MEASURE (rps, p99 or cpu) within one round, over the
    # rounds both answered in; empty with fewer than two. A ratio over all
    # rounds can sit on either side of a target only because the machine
    # changed speed between rounds; the spread shows how far it moves.
    function round_spread(measure, a, b,    r, n, x, lo, hi) {
      n = 0
      for (r = 1; r <= last_round; r++) {
        if (!rreq[a, r] || !rreq[b, r]) continue
        if (measure == "rps") x = ratio(rreq[a, r] / rus[a, r], rreq[b, r] / rus[b, r])
        else if (measure == "p99") x = ratio(rp99[a, r], rp99[b, r])
        else x = ratio(rcpu[a, r] / rreq[a, r], rcpu[b, r] / rreq[b, r])
        n++
        if (n == 1 || x < lo) lo = x
        if (n == 1 || x > hi) hi = x
      }
      return n < 2 ? "" : sprintf(", rounds %.2f–%.2f×", lo, hi)
    }
    # targets_line(LABEL, PEERS, TOLERANCE): one line setting `me` (ours; in
    # algorithms least_request) against the better of PEERS (the names of their
    # rows, space-separated) on each measure: the peer with more requests/s,
    # the one with the lower p99, the one that spent less proxy CPU per
    # request (not always the same one), each marked met or not: at or above
    # 1 - TOLERANCE times on requests/s, at or below 1 + TOLERANCE times on p99
    # and CPU; then our errors (met at zero), RSS against that of the leanest peer
    # (no target here; idle has one), and for h2 and grpc the spread.
    function targets_line(label, list, tol,    n, a, i, k, t, fast, low, lean, thin, sep, rounds_note) {
      fast = low = lean = thin = ""
      rounds_note = last_round > 1 ? "; rounds: the lowest and highest of the same ratio within one round" : ""
      n = split(list, a, " ")
      for (i = 1; i <= n; i++) {
        t = a[i]
        if (!req[t]) continue
        if (fast == "" || rps[t] > rps[fast]) fast = t
        if (low == "" || median(p99[t]) < median(p99[low])) low = t
        if (lean == "" || pcpu[t] < pcpu[lean]) lean = t
        if (thin == "" || rss[t] < rss[thin]) thin = t
      }
      printf "\nTargets%s: ", label == "" ? "" : " against the " label " peers"
      if (!req[me]) { printf "not checked, %s was not measured or answered nothing%s.\n", me, h2 ? " (see below)" : ""; return }
      if (fast == "") { printf "not checked, none of %s answered%s.\n", list, h2 ? " (see below)" : ""; return }
      printf "%ss/s %.2f× %s (%.0f%s), %s; p99 %.2f× %s (%.2f ms%s), %s; CPU per %s %.2f× %s (%.2f s / 100k%s), %s; errors %d, %s; RSS %.1f MiB, %.2f× %s (%.1f MiB)",
        unit, ratio(rps[me], rps[fast]), fast, rps[fast], round_spread("rps", me, fast), met(rps[me] >= (1 - tol) * rps[fast]),
        ratio(median(p99[me]), median(p99[low])), low, median(p99[low]) / 1000, round_spread("p99", me, low),
        met(median(p99[me]) <= (1 + tol) * median(p99[low])),
        unit, ratio(pcpu[me], pcpu[lean]), lean, pcpu[lean], round_spread("cpu", me, lean), met(pcpu[me] <= (1 + tol) * pcpu[lean]),
        err[me], met(err[me] == 0), rss[me] / 1024, ratio(rss[me], rss[thin]), thin, rss[thin] / 1024
      if (h2) {
        printf "; spread over the backends:"
        sep = " "
        for (k = 1; k <= count; k++) {
          t = order[k]
          if (!req[t]) continue
          printf "%s%s %s", sep, t, (even[t] < 0) ? "not counted" : met(even[t])
          sep = ", "
        }
      }
      if (tol) printf ". (%s against the better of %s on each measure: within %d %%, at or above %.2f× on %ss/s, at or below %.2f× on p99 and CPU%s.)\n", me, list, tol * 100, 1 - tol, unit, 1 + tol, rounds_note
      else printf ". (%s against the better of %s on each measure: at or above 1.00× on %ss/s, at or below on p99 and CPU%s%s.)\n", me, list, unit, h2 ? "; each backend within 5 % of a third, 31.7 to 35.0 %" : "", rounds_note
    }
    function median(list,    n, a, i, j, t) {
      n = split(list, a, " ")
      for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j] + 0 < a[j - 1] + 0; j--) {
        t = a[j]; a[j] = a[j - 1]; a[j - 1] = t
      }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    {
      t = $1
      if (!(t in seen)) { seen[t] = 1; order[++count] = t }
      split("", v)
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      req[t] += v["requests"] + v["messages"]; us[t] += v["duration_us"] + v["seconds"] * 1e6
      bytes[t] += v["bytes"]
      err[t] += v["err_connect"] + v["err_read"] + v["err_write"] + v["err_status"] + v["err_timeout"] + v["errors"]
      # grpc: calls that the backends ended with a status other than OK, which
      # h2load counts as answered (HTTP 200).
      err[t] += v["grpc_failed"]
      rounds[t]++
      # The figures of each round, for the spread of the ratios in the targets line.
      r = v["round"]; if (r > last_round) last_round = r
      rreq[t, r] = v["requests"] + v["messages"]; rus[t, r] = v["duration_us"] + v["seconds"] * 1e6
      rcpu[t, r] = v["user_ticks"] + v["sys_ticks"]; rp99[t, r] = v["p99_us"]
      if ("served" in v) {
        split(v["served"], sv, ",")
        s1[t] += sv[1]; s2[t] += sv[2]; s3[t] += sv[3]; counted[t]++
      }
      user[t] += v["user_ticks"]; sys[t] += v["sys_ticks"]
      backend[t] += v["backend_ticks"]; machine[t] += v["machine_ticks"]
      if (v["rss_mid_kib"] > rss[t]) rss[t] = v["rss_mid_kib"]
      p50[t] = p50[t] " " v["p50_us"]; p99[t] = p99[t] " " v["p99_us"]; p999[t] = p999[t] " " v["p999_us"]
    }
    END {
      short = (unit == "message") ? "msg" : (unit == "handshake") ? "hs" : (unit == "call") ? "calls" : "req"
      h2 = (scenario == "h2" || scenario == "grpc")
      for (k = 1; k <= count; k++) {
        t = order[k]; rps[t] = req[t] / (us[t] / 1e6)
        pcpu[t] = req[t] ? (user[t] + sys[t]) / tck / req[t] * 1e5 : 0
      }
      # policy has no `ours`: its column is against ours-rr.
      ref = (scenario == "policy") ? "ours-rr" : "ours"
      printf "| target | %ss/s | p50 ms | p99 ms | p99.9 ms | errors | vs direct | vs %s | CPU s / 100k %s | MiB/s | RSS MiB |%s\n",
        unit, ref, short, h2 ? " spread over the backends |" : ""
      print "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|" (h2 ? "--:|" : "")
      for (k = 1; k <= count; k++) {
        t = order[k]
        vd = (rps["direct"] > 0) ? sprintf("%.2f", rps[t] / rps["direct"]) : "-"
        vo = (rps[ref] > 0) ? sprintf("%.2f", rps[t] / rps[ref]) : "-"
        cpu = (t == "direct" || !req[t]) ? "-" : sprintf("%.2f", pcpu[t])
        mem = (t == "direct") ? "-" : sprintf("%.1f", rss[t] / 1024)
        lat = req[t] ? sprintf("%.2f | %.2f | %.2f", median(p50[t]) / 1000, median(p99[t]) / 1000, median(p999[t]) / 1000) : "- | - | -"
        printf "| %s | %.0f | %s | %d | %s | %s | %s | %.1f | %s |%s\n", t, rps[t], lat, err[t],
          vd, vo, cpu, bytes[t] / (us[t] / 1e6) / 1048576, mem, h2 ? " " spread(t) " |" : ""
      }
      # Where the CPU went. When the machine is saturated, requests/s is its busy
      # time over the whole chain'"'"'s cost per request, so a proxy gains throughput
      # only by what it takes off that sum, not off its own cost alone.
      print ""
      printf "CPU per %s, in µs: the proxy (user, kernel), the three backends, everything else (%s, interrupts), and the machine in all; busy is the share of all cores in use.\n",
        unit, (unit == "message") ? "wsload" : h2 ? "h2load" : "wrk"
      print ""
      print "| target | proxy user | proxy kernel | backends | rest | machine | busy |"
      print "|---|--:|--:|--:|--:|--:|--:|"
      for (k = 1; k <= count; k++) {
        t = order[k]
        if (!req[t]) { printf "| %s | - | - | - | - | - | %.0f %% |\n", t, busy(t); continue }
        f = 1e6 / tck / req[t]
        pu = (t == "direct") ? "-" : sprintf("%.1f", user[t] * f)
        pk = (t == "direct") ? "-" : sprintf("%.1f", sys[t] * f)
        printf "| %s | %s | %s | %.1f | %.1f | %.1f | %.0f %% |\n", t, pu, pk, backend[t] * f,
          (machine[t] - user[t] - sys[t] - backend[t]) * f, machine[t] * f,
          busy(t)
      }
      # The targets line(s): ours against the better peer on each measure;
      # policy: each policy against round robin.
      if (scenario == "policy") policy_lines(0.03)
      else {
        targets_line(plain_peers == "" ? "" : "like-for-like", peers, 0)
        if (plain_peers != "") targets_line("plain", plain_peers, 0.03)
      }
    }' "$WORK/$1.raw"
}

# ours_note SCENARIO: one line on our memory during the scenario.
ours_note() {
  local hwm
  hwm="$(status_kib "$(pid_of "$1" ours)" VmHWM)"
  awk -v hwm="$hwm" -v s="$1" '$1 == "ours" {
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      if (v["rss_mid_kib"] > rss) { rss = v["rss_mid_kib"]; fds = v["fds_mid"] }
    }
    END {
      printf "Ours: VmRSS %.1f MiB with %d open descriptors half-way through the %s run; ", rss / 1024, fds, s
      printf "peak RSS (VmHWM) since start %.1f MiB.\n", hwm / 1024
    }' "$WORK/$1.raw"
}

# run_scenario NAME CONNECTIONS ROUNDS PATH TARGETS...: warm up, then the rounds.
run_scenario() {
  local name="$1" conns="$2" rounds="$3" path="$4" target round
  shift 4
  say "scenario $name: GET $path, $conns connections, $rounds round(s) of ${DURATION}s per target"
  for target in "$@"; do
    # Opens the upstream pools and faults in the code paths; not recorded.
    generate "$name" "$target" "$conns" 1 "$path" >/dev/null 2>&1 || true
  done
  local targets=("$@") first
  for round in $(seq "$rounds"); do
    # Each round starts one target further on, so that no target always runs
    # first, or always right after the same one: a run leaves the machine
    # changed for the next (warm caches, a backlog of TIME_WAIT sockets after
    # churn), and a fixed order would hand one target the same turn each time.
    first=$(((round - 1) % ${#targets[@]}))
    for target in "${targets[@]:first}" "${targets[@]:0:first}"; do
      measure "$name" "$target" "$round" "$conns" "$DURATION" "$path"
    done
  done
  {
    echo "### $name: GET $path, $conns connections, $rounds × ${DURATION}s per target"
    echo
    # h2 and grpc go on when a target fails: there may be nothing to tabulate.
    if [[ -s "$WORK/$name.raw" ]]; then
      table "$name"
      echo
    fi
    if [[ " $* " == *" ours "* ]] && grep -q '^ours ' "$WORK/$name.raw" 2>/dev/null; then
      ours_note "$name"
      echo
    fi
    notes "$name"
  } >"$WORK/$name.md"
}

# notes SCENARIO: the targets of h2 or grpc that were not measured, or whose
# load generator failed, and why.
notes() {
  [[ -s "$WORK/$1.notes" ]] || return 0
  echo "Not measured, or failed:"
  echo
  cat "$WORK/$1.notes"
  echo
}

# run_h2 SCENARIO PATH: h2 or grpc. Each of ours, nginx and HAProxy is first
# tried with one curl request (grpc: one call, whose grpc-status must be 0);
# those that fail it are noted and left out, the rest measured like throughput.
run_h2() {
  local name="$1" path="$2" target why targets=()
  for target in ours nginx haproxy; do
    why="${UNAVAILABLE[$name:$target]:-}"
    if [[ -z "$why" && "$name" == grpc ]]; then
      why="$(grpc_probe "$(url_of "$name" "$target")")"
    elif [[ -z "$why" ]]; then
      why="$(h2_probe "$(url_of "$name" "$target")")"
    fi
    if [[ -n "$why" ]]; then
      say "$name: $target not measured: $why"
      echo "- $target: not measured: $why" >>"$WORK/$name.notes"
    else
      targets+=("$target")
    fi
  done
  if (( ${#targets[@]} )); then
    run_scenario "$name" "$H2_CONNECTIONS" "$ROUNDS" "$path" "${targets[@]}"
  else
    { echo "### $name: GET $path"; echo; notes "$name"; } >"$WORK/$name.md"
  fi
  local what="GET $path over h2c (prior knowledge)"
  [[ "$name" == grpc ]] && what="gRPC unary calls to $path (empty GetRequest) over h2c"
  sed -i "s|^### $name: GET $path, $H2_CONNECTIONS connections, |### $name: $what, $H2_CONNECTIONS connections × $H2_STREAMS streams, |;
    s|^### $name: GET $path\$|### $name: $what|" "$WORK/$name.md"
}

# soak: ours alone for SOAK_DURATION seconds; VmRSS at start, middle and end.
run_soak() {
  local wrk_pid line start mid end
  say "scenario soak: ours alone, GET /, $CONNECTIONS connections, ${SOAK_DURATION}s"
  wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "${SOAK_DURATION}s" --timeout 10s -s bench/report.lua \
    "${URL[ours]}/" >"$WORK/wrk.out" 2>&1 &
  wrk_pid=$!
  sleep 2
  start="$(status_kib "${PID[ours]}" VmRSS)"
  sleep "$((SOAK_DURATION / 2 - 2))"
  mid="$(status_kib "${PID[ours]}" VmRSS)"
  sleep "$((SOAK_DURATION / 2 - 2))"
  end="$(status_kib "${PID[ours]}" VmRSS)"
  wait "$wrk_pid" || { cat "$WORK/wrk.out" >&2; die "wrk failed"; }
  line="$(grep '^BENCH ' "$WORK/wrk.out")" || die "no wrk report"
  echo "ours round=1 ${line#BENCH }" >"$WORK/soak.raw"
  {
    echo "### soak: ours alone, GET /, $CONNECTIONS connections, ${SOAK_DURATION}s"
    echo
    awk -v a="$start" -v b="$mid" -v c="$end" '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        e = v["err_connect"] + v["err_read"] + v["err_write"] + v["err_status"] + v["err_timeout"]
        print "| requests/s | errors | VmRSS at 2 s | at middle | 2 s before end |"
        print "|--:|--:|--:|--:|--:|"
        printf "| %.0f | %d | %.1f MiB | %.1f MiB | %.1f MiB |\n", v["requests"] / (v["duration_us"] / 1e6), e, a / 1024, b / 1024, c / 1024
        # No peers here: the targets are no errors and a flat RSS (the end
        # within 5 % of the middle).
        printf "\nTargets: errors %d, %s; RSS 2 s before the end %.2f× that at the middle, %s (at or below 1.05×).\n",
          e, e ? "not met" : "met", b ? c / b : 0, (b && c <= 1.05 * b) ? "met" : "not met"
      }' "$WORK/soak.raw"
    echo
  } >"$WORK/soak.md"
}

# run_idle NAME (idle, or idle-tls over HTTPS): IDLE_CONNECTIONS keep-alive
# clients on each of ours, nginx and HAProxy, one request each, then held quiet
# by bench/idle.py; VmRSS (of all the target's processes) before they open and
# a second after the last has its answer. The memory a proxy frees when they
# close may be kept by its allocator and reused by the next run, so idle is
# best run first or alone.
run_idle() {
  local name="$1" target pid before after line holder _
  # What differs over HTTPS: each proxy's port, bench/idle.py's argument and
  # the words of the heading.
  local urls_of=URL tls=() over="" each="one GET / each"
  if [[ "$name" == idle-tls ]]; then
    urls_of=TLS_URL
    tls=(tls)
    over=" HTTPS"
    each="a TLS handshake and one GET / each"
  fi
  local -n urls="$urls_of"
  say "scenario $name: $IDLE_CONNECTIONS idle keep-alive$over connections to each of ours, nginx, haproxy"
  : >"$WORK/$name.raw"
  local targets=(ours nginx haproxy)
  # The baseline build has no HTTPS listener.
  [[ -n "$BASELINE_BIN" && "$name" == idle ]] && targets=(baseline ours nginx haproxy)
  for target in "${targets[@]}"; do
    pid="${PID[$target]}"
    before="$(rss_kib "$pid")"
    python3 bench/idle.py 127.0.0.1 "${urls[$target]##*:}" "$IDLE_CONNECTIONS" "${tls[@]}" >"$WORK/idle.out" 2>&1 &
    holder=$!
    for _ in $(seq 1200); do
      grep -q '^IDLE ' "$WORK/idle.out" && break
      kill -0 "$holder" 2>/dev/null || break
      sleep 0.1
    done
    line="$(grep '^IDLE ' "$WORK/idle.out")" ||
      { kill "$holder" 2>/dev/null; cat "$WORK/idle.out" >&2; die "idle clients failed against $target"; }
    sleep 1
    after="$(rss_kib "$pid")"
    kill "$holder" 2>/dev/null || true
    wait "$holder" 2>/dev/null || true
    echo "$target before_kib=$before after_kib=$after ${line#IDLE }" >>"$WORK/$name.raw"
    say "    $target: ${line#IDLE }, VmRSS $before -> $after KiB"
    # Let the proxy close them before the next target opens its own.
    sleep 1
  done
  {
    echo "### $name: $IDLE_CONNECTIONS keep-alive$over client connections per target, $each, then quiet"
    echo
    awk '{
        t = $1; order[++n] = t
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[t, kv[1]] = kv[2] }
        per[t] = v[t, "opened"] ? (v[t, "after_kib"] - v[t, "before_kib"]) / v[t, "opened"] : 0
      }
      END {
        print "| target | held | failed | VmRSS before MiB | VmRSS after MiB | KiB per idle connection |"
        print "|---|--:|--:|--:|--:|--:|"
        for (k = 1; k <= n; k++) {
          t = order[k]
          printf "| %s | %d | %d | %.1f | %.1f | %.2f |\n", t, v[t, "opened"], v[t, "failed"],
            v[t, "before_kib"] / 1024, v[t, "after_kib"] / 1024, per[t]
          if (t != "ours" && t != "baseline" && (best == "" || per[t] < per[best])) best = t
          # Memory an earlier scenario left free is reused by the idle
          # connections, so RSS may not grow at all: then nothing was read.
          if (v[t, "after_kib"] <= v[t, "before_kib"]) unread = unread (unread ? ", " : "") t
        }
        if (unread) printf "\nTargets: RSS per idle connection not read: VmRSS of %s did not grow while the connections were held (memory an earlier scenario freed was reused; run idle first or alone); failed connections %d, %s.\n\n",
          unread, v["ours", "failed"], v["ours", "failed"] ? "not met" : "met"
        else printf "\nTargets: RSS per idle connection %.2f× %s (%.2f KiB), %s; failed connections %d, %s. (At or below 1.00× the leaner of nginx and HAProxy; nginx counts every process, so its figure is an upper bound.)\n\n",
          per["ours"] / per[best], best, per[best], per["ours"] <= per[best] ? "met" : "not met",
          v["ours", "failed"], v["ours", "failed"] ? "not met" : "met"
      }' "$WORK/$name.raw"
  } >"$WORK/$name.md"
}

# start_ours NAME BACKENDS [KEYS]: another instance of our load balancer as
# target NAME (PID[NAME], URL[NAME]), on ports of its own, with static discovery
# over BACKENDS (their ports on 127.0.0.1, space-separated), logLevel warn, and
# KEYS (more configuration, `"key": value, ...`) in $WORK/NAME.json; waits until
# it is ready. algorithms and policy run several, one per configuration.
start_ours() {
  local name="$1" backends="$2" keys="${3:-}" p admin b list=""
  for b in $backends; do list+="${list:+, }\"127.0.0.1:$b\""; done
  port p
  port admin
  cat >"$WORK/$name.json" <<JSON
{
  "port": $p, "adminPort": $admin, "backendServiceName": "bench", "backendPort": ${backends##* },
  "discovery": "static", "logLevel": "warn",${keys:+ $keys,}
  "staticBackends": [$list]
}
JSON
  CONFIG_PATH="$WORK/$name.json" "$LB_BIN" >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
  PID[$name]="$!"
  URL[$name]="http://127.0.0.1:$p"
  await_200 "http://127.0.0.1:$admin/readyz" "${PID[$name]}" "$WORK/$name.log"
}

# algorithms: our load balancer twice more, over two normal backends and one slow
# one (responseDelayMs), once with round_robin and once with least_request.
run_algorithms() {
  local algorithm slow
  port slow
  printf '{"port": %d, "serviceName": "bench", "logLevel": "warn", "responseDelayMs": %d}\n' \
    "$slow" "$SLOW_BACKEND_MS" >"$WORK/backend-slow.json"
  POD_NAME="backend-slow" POD_IP=127.0.0.1 CONFIG_PATH="$WORK/backend-slow.json" \
    "$BACKEND_BIN" >"$WORK/backend-slow.log" 2>&1 &
  PIDS+=("$!")
  await_200 "http://127.0.0.1:$slow/" "$!" "$WORK/backend-slow.log"
  for algorithm in round_robin least_request; do
    start_ours "$algorithm" "${BACKEND_PORTS[0]} ${BACKEND_PORTS[1]} $slow" "\"algorithm\": \"$algorithm\""
  done
  run_scenario algorithms "$CONNECTIONS" "$ROUNDS" "/" round_robin least_request
  sed -i "s|^### algorithms: |### algorithms (one of three backends answers ${SLOW_BACKEND_MS} ms late): |" \
    "$WORK/algorithms.md"
}

# policy: the cost of affinity and of a rate limit in each proxy, against the
# same proxy in round robin. Ours three times over the three backends; nginx and
# HAProxy once more each with both policies on two ports (bench/nginx-policy.conf,
# bench/haproxy-policy.cfg; RSS is then that one process's, in both rows), their
# plain configuration as the round-robin baseline: the policy files are it plus
# the policy, written as a user would, with no header additions, while ours does
# its header work in all three of its rows alike. The rate limits are set far
# above what the machine can do, so that they are checked on every request and
# never refuse; every wrk connection comes from 127.0.0.1, so the per-client
# limit is one client's: the most contended case.
POLICY_RATE=10000000
run_policy() {
  local backends="${BACKEND_PORTS[*]}" ap rp target pods
  local rate="\"requestsPerSecond\": $POLICY_RATE, \"burst\": $POLICY_RATE"
  say "starting ours three more times for policy: round_robin, consistent_hash on X-User, a rate limit"
  start_ours ours-rr "$backends" '"algorithm": "round_robin"'
  start_ours ours-affinity "$backends" '"algorithm": "consistent_hash", "hashOn": {"header": "X-User"}'
  start_ours ours-ratelimit "$backends" "\"algorithm\": \"round_robin\",
  \"rateLimit\": {\"perClient\": {$rate, \"key\": \"sourceIp\"}, \"global\": {$rate}}"
  say "starting nginx and HAProxy with affinity and a rate limit (bench/nginx-policy.conf, bench/haproxy-policy.cfg)"
  port ap
  port rp
  mkdir -m 777 "$WORK/nginx-policy-tmp"
  fill bench/nginx-policy.conf AFFINITY_PORT="$ap" RATELIMIT_PORT="$rp" >"$WORK/nginx-policy.conf"
  nginx -p "$WORK" -e "$WORK/nginx-policy-error.log" -c "$WORK/nginx-policy.conf" >"$WORK/nginx-policy.log" 2>&1 &
  PIDS+=("$!")
  PID[nginx-affinity]="$!"
  PID[nginx-ratelimit]="$!"
  URL[nginx-affinity]="http://127.0.0.1:$ap"
  URL[nginx-ratelimit]="http://127.0.0.1:$rp"
  port ap
  port rp
  fill bench/haproxy-policy.cfg AFFINITY_PORT="$ap" RATELIMIT_PORT="$rp" >"$WORK/haproxy-policy.cfg"
  haproxy -db -f "$WORK/haproxy-policy.cfg" >"$WORK/haproxy-policy.log" 2>&1 &
  PIDS+=("$!")
  PID[haproxy-affinity]="$!"
  PID[haproxy-ratelimit]="$!"
  URL[haproxy-affinity]="http://127.0.0.1:$ap"
  URL[haproxy-ratelimit]="http://127.0.0.1:$rp"
  for target in nginx-affinity nginx-ratelimit; do
    await_200 "${URL[$target]}/" "${PID[$target]}" "$WORK/nginx-policy-error.log"
  done
  for target in haproxy-affinity haproxy-ratelimit; do
    await_200 "${URL[$target]}/" "${PID[$target]}" "$WORK/haproxy-policy.log"
  done
  # The round-robin baselines of nginx and HAProxy: their plain instances.
  for target in nginx haproxy; do
    PID[$target-rr]="${PID[$target-plain]}"
    URL[$target-rr]="${URL[$target-plain]}"
  done
  # Affinity that does not hold would make a cheap round robin look like it:
  # six requests of one user must reach one backend (round robin: all three).
  for target in ours-affinity nginx-affinity haproxy-affinity; do
    pods="$(for _ in 1 2 3 4 5 6; do
        curl -s --max-time 5 -H 'X-User: user-7' "${URL[$target]}/" | sed -n 's/.*"podName":"\([^"]*\)".*/\1/p'
      done | sort -u | wc -l)"
    if (( pods != 1 )); then
      echo "- $target: six requests with one X-User reached $pods backends: not sticky" >>"$WORK/policy.notes"
      say "policy: $target is not sticky ($pods backends for one X-User)"
    fi
  done
  run_scenario policy "$CONNECTIONS" "$ROUNDS" "/" ours-rr ours-affinity ours-ratelimit \
    nginx-rr nginx-affinity nginx-ratelimit haproxy-rr haproxy-affinity haproxy-ratelimit
  sed -i "s|^### policy: GET /, |### policy: GET / with an X-User per request (bench/policy.lua), round robin, affinity on X-User, a rate limit that never binds, |" \
    "$WORK/policy.md"
}

# tls_negotiated: what each proxy's HTTPS port settles on with an OpenSSL client
# like wrk's (no ALPN, wrk offers none; key exchange and signature as s_client
# reports them), and whether a second connection resumes the first one's session,
# as wrk's next connection does. s_client is kept open 0.3 s so that it reads the
# TLS 1.3 session tickets, which arrive after the handshake.
tls_negotiated() {
  local target out first again
  printf 'Negotiated with openssl s_client (OpenSSL %s, as wrk links):' "$(openssl version | awk '{ print $2 }')"
  for target in ours nginx haproxy; do
    out="$(sleep 0.3 | openssl s_client -connect "${TLS_URL[$target]#https://}" -servername localhost \
      -sess_out "$WORK/$target.sess" 2>/dev/null || true)"
    first="$(awk '/^New, / { sub(/,$/, "", $2); v = $2 " " $NF }
      /^Server Temp Key: / { sub(/,$/, "", $4); k = $4 }
      /^Peer signature type: / { g = $4 }
      END { print v, k, g }' <<<"$out")"
    again="$(sleep 0.3 | openssl s_client -connect "${TLS_URL[$target]#https://}" -servername localhost \
      -sess_in "$WORK/$target.sess" 2>/dev/null | awk '/^(New|Reused), / { print $1 }' || true)"
    printf ' %s %s, resumption %s;' "$target" "${first:-?}" "$([[ "$again" == Reused, ]] && echo yes || echo no)"
  done
  echo
  echo
}

# scale: discovery and health checks at 10,000 endpoints, in a program of its own
# (loadbalancer/examples/scale.rs, see its docs) that runs the real discovery
# against the tests' fake API server in a child process; it writes its table.
run_scale() {
  local bin="$TARGET_DIR/release/examples/scale"
  if [[ "$SKIP_BUILD" != 1 ]]; then
    say "building the scale benchmark (loadbalancer/examples/scale.rs)"
    cargo build --release --locked -p loadbalancer --example scale
  fi
  [[ -x "$bin" ]] || die "$bin missing; run without --skip-build"
  say "scenario scale: ${SCALE_SLICES:-100} slices of ${SCALE_ENDPOINTS:-100} endpoints, ${SCALE_UPDATES:-300} updates, then health checks (about a minute)"
  "$bin" --slices "${SCALE_SLICES:-100}" --endpoints-per-slice "${SCALE_ENDPOINTS:-100}" \
    --updates "${SCALE_UPDATES:-300}" --health-seconds "${SCALE_HEALTH_SECONDS:-20}" \
    --report "$WORK/scale.md" >"$WORK/scale.log" 2>"$WORK/scale.err" ||
    { tail -n 20 "$WORK/scale.err" >&2; die "the scale benchmark failed"; }
  echo >>"$WORK/scale.md"
}

PROXIES=(direct ours nginx haproxy)
# throughput and churn: the peers in both configurations.
BOTH=(direct ours nginx haproxy nginx-plain haproxy-plain)
[[ -n "$BASELINE_BIN" ]] && BOTH=(direct baseline ours nginx haproxy nginx-plain haproxy-plain)
for s in "${SCENARIOS[@]}"; do
  case "$s" in
    throughput) run_scenario throughput "$CONNECTIONS" "$ROUNDS" "/" "${BOTH[@]}" ;;
    churn)
      run_scenario churn "$CONNECTIONS" "$ROUNDS" "/" "${BOTH[@]}"
      sed -i "s|^### churn: GET /, |### churn: GET / with \`Connection: close\` (a new client connection per request, upstream keep-alive), |" \
        "$WORK/churn.md"
      ;;
    slow) run_scenario slow "$SLOW_CONNECTIONS" 1 "/work?sleep_ms=$SLOW_SLEEP_MS" "${PROXIES[@]}" ;;
    bigbody) run_scenario bigbody "$BIG_CONNECTIONS" 1 "/work?bytes=$BIG_BYTES" "${PROXIES[@]}" ;;
    websocket)
      run_scenario websocket "$WS_CONNECTIONS" "$ROUNDS" /ws "${PROXIES[@]}"
      sed -i "s|^### websocket: GET /ws, |### websocket: ${WS_BYTES}-byte binary messages echoed on /ws, |" \
        "$WORK/websocket.md"
      ;;
    tls)
      # direct is left out: the backends speak plain HTTP.
      run_scenario tls "$CONNECTIONS" "$ROUNDS" / ours nginx haproxy
      run_scenario tls-handshake "$CONNECTIONS" "$ROUNDS" / ours nginx haproxy
      sed -i "s|^### tls: GET /, |### tls: GET / over keep-alive HTTPS connections, |" "$WORK/tls.md"
      sed -i "s|^### tls-handshake: GET /, |### tls-handshake: GET / over HTTPS with \`Connection: close\` (a TLS handshake per request), |" \
        "$WORK/tls-handshake.md"
      tls_negotiated >>"$WORK/tls.md"
      cat "$WORK/tls-handshake.md" >>"$WORK/tls.md"
      ;;
    soak) run_soak ;;
    idle | idle-tls) run_idle "$s" ;;
    algorithms) run_algorithms ;;
    policy) run_policy ;;
    h2) run_h2 h2 / ;;
    grpc)
      if [[ -n "$GRPC_SKIP" ]]; then
        printf '### grpc: not run\n\nNo gRPC servers to measure against: %s.\n\n' "$GRPC_SKIP" >"$WORK/grpc.md"
      else
        run_h2 grpc "$GRPC_PATH"
      fi
      ;;
    scale) run_scale ;;
  esac
done

# --- report ------------------------------------------------------------------

{
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $CORES cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), Linux $(uname -r)."
  if (( NEED_WRK )); then
    echo "Load generator: $(wrk -v 2>&1 | head -n 1 | awk '{ print $1, $2 }'), $WRK_THREADS threads, keep-alive, on the same cores."
    [[ " ${SCENARIOS[*]} " == *" policy "* ]] &&
      echo "policy: wrk runs bench/policy.lua against every target, a Lua callback per request (an X-User header from 10,000 users in turn)."
    (( NEED_TLS )) && echo "HTTPS: one ECDSA P-256 certificate for all; wrk linked against $(ldd "$(command -v wrk)" | awk '/libssl/ { print $1; exit }')."
  fi
  if (( NEED_H2LOAD )); then
    echo "HTTP/2 load generator: $(h2load --version | awk '{ print $1, $2 }'), $WRK_THREADS threads, $H2_CONNECTIONS connections × $H2_STREAMS concurrent streams, h2c with prior knowledge, on the same cores."
    [[ " ${SCENARIOS[*]} " == *" grpc "* && -n "$GRPC_BACKENDS" ]] &&
      echo "gRPC servers: GRPC_BACKENDS ($GRPC_BACKENDS), not the script's backends: their CPU is under rest, not backends, and their spread is not counted."
  fi
  if (( NEED_WSLOAD )); then
    echo "WebSocket load generator: wsload (backend/examples/wsload.rs), $WRK_THREADS threads, one message in flight per connection, on the same cores."
  fi
  echo "Versions: $(nginx -v 2>&1 | sed 's/.*: //'), $(haproxy -v | head -n 1 | awk '{ print "HAProxy", $3 }'), $(rustc --version | awk '{ print $1, $2 }')."
  echo
  echo "Command: \`$COMMAND\`"
  echo
  for s in "${SCENARIOS[@]}"; do cat "$WORK/$s.md"; done
} >"$WORK/report.md"
echo
cat "$WORK/report.md"

# The run replaces only its own block of docs/bench-results.md (between the
# markers), so the hand-written notes around it survive; docs/performance.md
# explains the figures.
if [[ "$NO_WRITE" != 1 ]]; then
  # Soak, websocket, tls, churn, idle and policy on their own keep a block of
  # their own, apart from the main run's.
  block=run
  [[ "${SCENARIOS[*]}" == soak ]] && block=soak
  [[ "${SCENARIOS[*]}" == websocket ]] && block=websocket
  [[ "${SCENARIOS[*]}" == tls ]] && block=tls
  [[ "${SCENARIOS[*]}" == churn ]] && block=churn
  # idle and idle-tls, alone or together, keep a block of their own.
  [[ " ${SCENARIOS[*]} " =~ ^(\ (idle|idle-tls))+\ $ ]] && block=idle
  [[ "${SCENARIOS[*]}" == policy ]] && block=policy
  # h2 and grpc, alone or together, keep a block of their own.
  [[ " ${SCENARIOS[*]} " =~ ^(\ (h2|grpc))+\ $ ]] && block=h2
  [[ "${SCENARIOS[*]}" == scale ]] && block=scale
  results=docs/bench-results.md
  [[ -f "$results" ]] ||
    printf '# Benchmark results\n\nThe latest make bench run, as scripts/bench.sh writes it; [Performance](performance.md) explains it. Back to the [README](../README.md).\n' >"$results"
  grep -qx "<!-- bench:$block -->" "$results" ||
    printf '\n<!-- bench:%s -->\n<!-- /bench:%s -->\n' "$block" "$block" >>"$results"
  awk -v begin="<!-- bench:$block -->" -v end="<!-- /bench:$block -->" -v file="$WORK/report.md" '
    $0 == begin { print; while ((getline line < file) > 0) print line; skip = 1; next }
    $0 == end { skip = 0 }
    !skip { print }' "$results" >"$WORK/results.md"
  cp "$WORK/results.md" "$results"
  say "written to $results"
fi
