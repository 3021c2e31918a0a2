#!/usr/bin/env bash
# Benchmark: our load balancer against nginx and HAProxy on this machine, in one run.
#
# Starts three backends on loopback, then measures with wrk (keep-alive clients,
# over HTTPS for tls), or for WebSockets with wsload (backend/examples/wsload.rs),
# against:
#   direct   one backend, no proxy: the ceiling
#   ours     our load balancer, static discovery over the three
#   nginx    round-robin over the three, upstream keep-alive  (bench/nginx.conf)
#   haproxy  round-robin over the three, http-reuse always    (bench/haproxy.cfg)
# Targets run interleaved in rounds (direct ours nginx haproxy, direct ours ...)
# so drift in the machine's load hits all of them alike. Prints one table per
# scenario and writes the same to docs/bench-results.md.
#
# Scenarios (--scenario a,b,...; env SCENARIO; default throughput,slow,bigbody):
#   throughput  GET /, small JSON answers: proxy overhead per request
#   slow        GET /work?sleep_ms=50 over 1000 connections: many requests in flight
#   bigbody     GET /work?bytes=1048576: 1 MiB responses, streaming throughput
#   soak        ours only, 60 s: VmRSS at start, middle and end (should stay flat)
#   algorithms  ours with round_robin against ours with least_request, over two
#               backends and one that answers SLOW_BACKEND_MS (20) late: p99
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
#   --threads N         wrk and wsload threads (default 2)      (env WRK_THREADS)
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
# (/proc/stat), and says what ours would have to cost for 1.1 times the best
# other proxy's throughput when the machine is the limit; for websocket a line
# gives ours against the better of nginx and HAProxy on messages/s and on p99,
# for tls also on CPU per request.
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
SLOW_BACKEND_MS="${SLOW_BACKEND_MS:-20}"
WRK_THREADS="${WRK_THREADS:-2}"
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
  BIG_BYTES WS_CONNECTIONS WS_BYTES SOAK_DURATION WRK_THREADS; do
  [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || die "$var must be a positive whole number, got '${!var}'"
done
(( SOAK_DURATION >= 10 )) || die "SOAK_DURATION must be at least 10 (seconds)"
# The backend's echo takes messages up to 16 MiB (MAX_MESSAGE_BYTES).
(( WS_BYTES <= 16777216 )) || die "WS_BYTES must be at most 16777216 (the backend's message limit)"
IFS=, read -r -a SCENARIOS <<<"$SCENARIO"
for s in "${SCENARIOS[@]}"; do
  [[ "$s" =~ ^(throughput|slow|bigbody|soak|algorithms|websocket|tls|scale)$ ]] || die "unknown scenario '$s'"
done
# Which load generators the chosen scenarios need: wsload for websocket, wrk for
# every other; tls needs a certificate and HTTPS listeners besides.
NEED_WRK=0
NEED_WSLOAD=0
NEED_TLS=0
for s in "${SCENARIOS[@]}"; do
  if [[ "$s" == websocket ]]; then NEED_WSLOAD=1; else NEED_WRK=1; fi
  [[ "$s" == tls ]] && NEED_TLS=1
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
PATH="$PATH:/usr/sbin:/sbin"
COMMAND="SCENARIO=$SCENARIO DURATION=$DURATION ROUNDS=$ROUNDS CONNECTIONS=$CONNECTIONS"
COMMAND+=" SLOW_CONNECTIONS=$SLOW_CONNECTIONS BIG_CONNECTIONS=$BIG_CONNECTIONS"
(( NEED_WSLOAD )) && COMMAND+=" WS_CONNECTIONS=$WS_CONNECTIONS WS_BYTES=$WS_BYTES"
COMMAND+=" WRK_THREADS=$WRK_THREADS scripts/bench.sh"

# --- tools -------------------------------------------------------------------

# ensure_tool COMMAND PACKAGE...: installs the first Debian package that works
# if COMMAND is missing, and says so either way.
ensure_tool() {
  local tool="$1" package sudo=()
  shift
  if command -v "$tool" >/dev/null; then
    say "$tool: found at $(command -v "$tool")"
    return
  fi
  [[ "$(id -u)" -eq 0 ]] || sudo=(sudo)
  command -v apt-get >/dev/null || die "$tool is missing and there is no apt-get; install $* by hand"
  say "$tool: missing, installing from Debian ($*)"
  "${sudo[@]}" apt-get update -qq
  for package in "$@"; do
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" && break
  done
  command -v "$tool" >/dev/null || die "could not install $tool"
}
(( NEED_WRK )) && ensure_tool wrk wrk
ensure_tool nginx nginx-light nginx
ensure_tool haproxy haproxy
(( NEED_TLS )) && ensure_tool openssl openssl
command -v curl >/dev/null || die "curl is required"

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

# await_200 URL PID LOG: up to 15 s for URL to answer 200 while PID lives.
await_200() {
  local url="$1" pid="$2" log="$3" _
  for _ in $(seq 150); do
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "process for $url exited (log above)"; }
    # -k: the tls scenario's certificate is self-signed.
    [[ "$(curl -sk -o /dev/null -w '%{http_code}' "$url" || true)" == 200 ]] && return
    sleep 0.1
  done
  cat "$log" >&2
  die "$url did not answer 200"
}

say "starting three backends (logLevel warn)"
BACKEND_PORTS=()
BACKEND_PIDS=()
for i in 1 2 3; do
  port p
  printf '{"port": %d, "serviceName": "bench", "logLevel": "warn"}\n' "$p" >"$WORK/backend-$i.json"
  POD_NAME="backend-$i" POD_IP=127.0.0.1 CONFIG_PATH="$WORK/backend-$i.json" \
    "$BACKEND_BIN" >"$WORK/backend-$i.log" 2>&1 &
  PIDS+=("$!")
  await_200 "http://127.0.0.1:$p/" "$!" "$WORK/backend-$i.log"
  BACKEND_PORTS+=("$p")
  BACKEND_PIDS+=("$!")
done

# URL: plain HTTP; TLS_URL: the same target over HTTPS (tls scenario only).
declare -A URL PID TLS_URL
URL[direct]="http://127.0.0.1:${BACKEND_PORTS[0]}"
PID[direct]="${PIDS[0]}"

# fill TEMPLATE PORT [TLS_PORT]: the template with every @NAME@ replaced.
fill() {
  sed -e "s|@WORK@|$WORK|g" -e "s|@PORT@|$2|g" -e "s|@TLS_PORT@|${3:-0}|g" -e "s|@THREADS@|$CORES|g" -e "s|@MAXCONN@|$MAXCONN|g" \
    -e "s|@B1@|${BACKEND_PORTS[0]}|g" -e "s|@B2@|${BACKEND_PORTS[1]}|g" \
    -e "s|@B3@|${BACKEND_PORTS[2]}|g" "$1"
}

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

if [[ "${SCENARIOS[*]}" != soak ]]; then
  say "starting nginx (worker_processes auto) and HAProxy (nbthread $CORES)"
  port p
  mkdir -m 777 "$WORK/nginx-tmp"
  fill bench/nginx.conf "$p" >"$WORK/nginx.conf"
  if (( NEED_TLS )); then
    # nginx.conf includes $WORK/nginx-tls*.conf: the HTTPS server.
    port tp
    fill bench/nginx-tls.conf "$p" "$tp" >"$WORK/nginx-tls.conf"
    TLS_URL[nginx]="https://127.0.0.1:$tp"
  fi
  nginx -p "$WORK" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf" >"$WORK/nginx.log" 2>&1 &
  PIDS+=("$!")
  PID[nginx]="$!"
  URL[nginx]="http://127.0.0.1:$p"
  await_200 "${URL[nginx]}/" "${PID[nginx]}" "$WORK/nginx-error.log"
  (( NEED_TLS )) && await_200 "${TLS_URL[nginx]}/" "${PID[nginx]}" "$WORK/nginx-error.log"

  port p
  haproxy_files=(-f "$WORK/haproxy.cfg")
  fill bench/haproxy.cfg "$p" >"$WORK/haproxy.cfg"
  if (( NEED_TLS )); then
    # The HTTPS frontend, a second configuration file.
    port tp
    fill bench/haproxy-tls.cfg "$p" "$tp" >"$WORK/haproxy-tls.cfg"
    haproxy_files+=(-f "$WORK/haproxy-tls.cfg")
    TLS_URL[haproxy]="https://127.0.0.1:$tp"
  fi
  haproxy -db "${haproxy_files[@]}" >"$WORK/haproxy.log" 2>&1 &
  PIDS+=("$!")
  PID[haproxy]="$!"
  URL[haproxy]="http://127.0.0.1:$p"
  await_200 "${URL[haproxy]}/" "${PID[haproxy]}" "$WORK/haproxy.log"
  (( NEED_TLS )) && await_200 "${TLS_URL[haproxy]}/" "${PID[haproxy]}" "$WORK/haproxy.log"
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

# rss_kib TARGET: VmRSS of the target's process and its children (nginx workers)
# summed, in KiB. Pages the processes share (nginx's code) count once per process,
# so nginx's figure is an upper bound.
rss_kib() {
  local main="${PID[$1]}" pid total=0 kib
  for pid in "$main" $(pgrep -P "$main" || true); do
    kib="$(status_kib "$pid" VmRSS 2>/dev/null)" || continue
    total=$((total + ${kib:-0}))
  done
  echo "$total"
}

# generate SCENARIO TARGET CONNECTIONS SECONDS PATH: the scenario's load against
# TARGET, in the foreground, ending with one line of "key=value ..." (wrk's begins
# with `BENCH `, see bench/report.lua). wsload (backend/examples/wsload.rs)
# drives the websocket scenario, wrk every other; tls and tls-handshake go to the
# target's HTTPS port, tls-handshake with `Connection: close`, so that the proxy
# closes each connection after one answer and wrk opens a new one (a new TLS
# handshake) for the next request.
generate() {
  local scenario="$1" target="$2" conns="$3" secs="$4" path="$5"
  if [[ "$scenario" == websocket ]]; then
    "$WSLOAD_BIN" --url "ws://${URL[$target]#http://}$path" --connections "$conns" \
      --duration "$secs" --size "$WS_BYTES" --threads "$WRK_THREADS"
  elif [[ "$scenario" == tls ]]; then
    wrk -t "$WRK_THREADS" -c "$conns" -d "${secs}s" --timeout 10s -s bench/report.lua \
      "${TLS_URL[$target]}$path"
  elif [[ "$scenario" == tls-handshake ]]; then
    wrk -t "$WRK_THREADS" -c "$conns" -d "${secs}s" --timeout 10s -s bench/report.lua \
      -H 'Connection: close' "${TLS_URL[$target]}$path"
  else
    wrk -t "$WRK_THREADS" -c "$conns" -d "${secs}s" --timeout 10s -s bench/report.lua \
      "${URL[$target]}$path"
  fi
}

# measure SCENARIO TARGET ROUND CONNECTIONS SECONDS PATH: one run of the load
# generator; appends "TARGET key=value ..." to $WORK/SCENARIO.raw. Each proxy's RSS
# (and our open descriptors) is also sampled half-way through, while the load is on.
measure() {
  local scenario="$1" target="$2" round="$3" conns="$4" secs="$5" path="$6"
  local load_pid line mid=""
  local user0 sys0 user1 sys1 backends0 backends1 machine0 machine1
  # Direct has no proxy process: its own backend is counted under backends.
  local proxy_pids=()
  [[ "$target" != direct ]] && proxy_pids=("${PID[$target]}")
  read -r user0 sys0 < <(cpu_ticks "${proxy_pids[@]}")
  read -r backends0 < <(cpu_ticks "${BACKEND_PIDS[@]}" | awk '{ print $1 + $2 }')
  machine0="$(machine_ticks)"
  generate "$scenario" "$target" "$conns" "$secs" "$path" >"$WORK/load.out" 2>&1 &
  load_pid=$!
  if [[ "$target" != direct ]]; then
    sleep "$(awk -v s="$secs" 'BEGIN { print s / 2 }')"
    mid="rss_mid_kib=$(rss_kib "$target")"
    [[ "$target" == ours ]] && mid+=" fds_mid=$(find "/proc/${PID[ours]}/fd" -mindepth 1 | wc -l)"
  fi
  wait "$load_pid" || { cat "$WORK/load.out" >&2; die "the load generator failed against $target"; }
  machine1="$(machine_ticks)"
  read -r user1 sys1 < <(cpu_ticks "${proxy_pids[@]}")
  read -r backends1 < <(cpu_ticks "${BACKEND_PIDS[@]}" | awk '{ print $1 + $2 }')
  line="$(grep -E '^(BENCH |messages=)' "$WORK/load.out")" ||
    { cat "$WORK/load.out" >&2; die "no report from the load generator"; }
  line="${line#BENCH }"
  echo "$target round=$round user_ticks=$((user1 - user0)) sys_ticks=$((sys1 - sys0))" \
    "backend_ticks=$((backends1 - backends0)) machine_ticks=$((machine1 - machine0))" \
    "$line $mid" >>"$WORK/$scenario.raw"
  # wrk reports requests and duration_us, wsload messages and seconds.
  printf '    round %d %-8s %s\n' "$round" "$target" \
    "$(awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
              if ("messages" in v) printf "%.0f msg/s", v["messages"] / v["seconds"]
              else printf "%.0f req/s", v["requests"] / (v["duration_us"] / 1e6)
              printf ", p99 %.2f ms", v["p99_us"] / 1000
              if (v["errors"] > 0) printf ", %d errors", v["errors"] }' <<<"$line")" >&2
}

# table SCENARIO: the markdown table for the scenario's raw lines. Counts are
# requests, for websocket round-trip messages, for tls-handshake handshakes (one
# request each); wrk reports requests and duration_us, wsload messages and seconds.
table() {
  local unit=request
  [[ "$1" == websocket ]] && unit=message
  [[ "$1" == tls-handshake ]] && unit=handshake
  awk -v tck="$CLK_TCK" -v cores="$CORES" -v unit="$unit" -v scenario="$1" '
    function busy(t) { return 100 * machine[t] / tck / (us[t] / 1e6) / cores }
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
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      req[t] += v["requests"] + v["messages"]; us[t] += v["duration_us"] + v["seconds"] * 1e6
      bytes[t] += v["bytes"]
      err[t] += v["err_connect"] + v["err_read"] + v["err_write"] + v["err_status"] + v["err_timeout"] + v["errors"]
      user[t] += v["user_ticks"]; sys[t] += v["sys_ticks"]
      backend[t] += v["backend_ticks"]; machine[t] += v["machine_ticks"]
      if (v["rss_mid_kib"] > rss[t]) rss[t] = v["rss_mid_kib"]
      p50[t] = p50[t] " " v["p50_us"]; p99[t] = p99[t] " " v["p99_us"]; p999[t] = p999[t] " " v["p999_us"]
    }
    END {
      short = (unit == "message") ? "msg" : (unit == "handshake") ? "hs" : "req"
      for (k = 1; k <= count; k++) { t = order[k]; rps[t] = req[t] / (us[t] / 1e6) }
      printf "| target | %ss/s | p50 ms | p99 ms | p99.9 ms | errors | vs direct | vs ours | CPU s / 100k %s | MiB/s | RSS MiB |\n", unit, short
      print "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
      for (k = 1; k <= count; k++) {
        t = order[k]
        vd = ("direct" in rps) ? sprintf("%.2f", rps[t] / rps["direct"]) : "-"
        vo = ("ours" in rps) ? sprintf("%.2f", rps[t] / rps["ours"]) : "-"
        cpu = (t == "direct") ? "-" : sprintf("%.2f", (user[t] + sys[t]) / tck / req[t] * 1e5)
        mem = (t == "direct") ? "-" : sprintf("%.1f", rss[t] / 1024)
        printf "| %s | %.0f | %.2f | %.2f | %.2f | %d | %s | %s | %s | %.1f | %s |\n", t, rps[t],
          median(p50[t]) / 1000, median(p99[t]) / 1000, median(p999[t]) / 1000, err[t],
          vd, vo, cpu, bytes[t] / (us[t] / 1e6) / 1048576, mem
      }
      # Where the CPU went. When the machine is saturated, requests/s is its busy
      # time over the whole chain'"'"'s cost per request, so a proxy gains throughput
      # only by what it takes off that sum, not off its own cost alone.
      print ""
      printf "CPU per %s, in µs: the proxy (user, kernel), the three backends, everything else (%s, interrupts), and the machine in all; busy is the share of all cores in use.\n",
        unit, (unit == "message") ? "wsload" : "wrk"
      print ""
      print "| target | proxy user | proxy kernel | backends | rest | machine | busy |"
      print "|---|--:|--:|--:|--:|--:|--:|"
      for (k = 1; k <= count; k++) {
        t = order[k]
        f = 1e6 / tck / req[t]
        pu = (t == "direct") ? "-" : sprintf("%.1f", user[t] * f)
        pk = (t == "direct") ? "-" : sprintf("%.1f", sys[t] * f)
        printf "| %s | %s | %s | %.1f | %.1f | %.1f | %.0f %% |\n", t, pu, pk, backend[t] * f,
          (machine[t] - user[t] - sys[t] - backend[t]) * f, machine[t] * f,
          busy(t)
        if (t != "direct" && t != "ours" && (best == "" || machine[t] / req[t] < machine[best] / req[best])) best = t
      }
      # Only where the machine was the limit: otherwise requests/s is bound by
      # something else (the backends sleeping, in the slow scenario).
      if (("ours" in rps) && best != "" && busy("ours") >= 95 && busy(best) >= 95) {
        # At the same cost per request for everything but ours, ours must spend
        # this much at most for the machine to serve 1.1 times the best one.
        need = machine[best] / req[best] / 1.1 - (machine["ours"] - user["ours"] - sys["ours"]) / req["ours"]
        printf "\nFor 1.1× the cheapest other proxy (%s, %.1f µs of machine per %s) with the rest costing what it did, ours would have to spend at most %.1f µs per %s; it spent %.1f.\n",
          best, machine[best] * 1e6 / tck / req[best], unit, need * 1e6 / tck, unit, (user["ours"] + sys["ours"]) * 1e6 / tck / req["ours"]
      }
      # WebSocket: ours against the better peer on each measure, the one with
      # more messages/s and the one with the lower p99 (not always the same).
      if (unit == "message" && ("ours" in rps) && ("nginx" in rps) && ("haproxy" in rps)) {
        fast = (rps["nginx"] >= rps["haproxy"]) ? "nginx" : "haproxy"
        low = (median(p99["nginx"]) <= median(p99["haproxy"])) ? "nginx" : "haproxy"
        printf "\nOurs against the better peer: %.2f× the messages/s of %s (%.0f), %.2f× the p99 of %s (%.2f ms); at or above 1.00× on messages/s and at or below 1.00× on p99 meets the target.\n",
          rps["ours"] / rps[fast], fast, rps[fast], median(p99["ours"]) / median(p99[low]), low, median(p99[low]) / 1000
      }
      # TLS: the same, and on CPU per request (per handshake) of the proxy, against
      # the peer that spent less.
      if (scenario ~ /^tls/ && ("ours" in rps) && ("nginx" in rps) && ("haproxy" in rps)) {
        fast = (rps["nginx"] >= rps["haproxy"]) ? "nginx" : "haproxy"
        low = (median(p99["nginx"]) <= median(p99["haproxy"])) ? "nginx" : "haproxy"
        for (k = 1; k <= count; k++) { t = order[k]; pcpu[t] = (user[t] + sys[t]) / tck / req[t] * 1e5 }
        lean = (pcpu["nginx"] <= pcpu["haproxy"]) ? "nginx" : "haproxy"
        printf "\nOurs against the better peer: %.2f× the %ss/s of %s (%.0f), %.2f× the p99 of %s (%.2f ms), %.2f× the CPU per %s of %s (%.2f s / 100k); at or above 1.00× on %ss/s and at or below 1.00× on p99 and CPU meets the target.\n",
          rps["ours"] / rps[fast], unit, fast, rps[fast], median(p99["ours"]) / median(p99[low]), low, median(p99[low]) / 1000,
          pcpu["ours"] / pcpu[lean], unit, lean, pcpu[lean], unit
      }
    }' "$WORK/$1.raw"
}

# ours_note SCENARIO: one line on our memory during the scenario.
ours_note() {
  local hwm
  hwm="$(status_kib "${PID[ours]}" VmHWM)"
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
  for round in $(seq "$rounds"); do
    for target in "$@"; do measure "$name" "$target" "$round" "$conns" "$DURATION" "$path"; done
  done
  {
    echo "### $name: GET $path, $conns connections, $rounds × ${DURATION}s per target"
    echo
    table "$name"
    echo
    if [[ " $* " == *" ours "* ]]; then
      ours_note "$name"
      echo
    fi
  } >"$WORK/$name.md"
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
      }' "$WORK/soak.raw"
    echo
  } >"$WORK/soak.md"
}

# algorithms: our load balancer twice more, over two normal backends and one slow
# one (responseDelayMs), once with round_robin and once with least_request.
run_algorithms() {
  local algorithm p admin slow
  port slow
  printf '{"port": %d, "serviceName": "bench", "logLevel": "warn", "responseDelayMs": %d}\n' \
    "$slow" "$SLOW_BACKEND_MS" >"$WORK/backend-slow.json"
  POD_NAME="backend-slow" POD_IP=127.0.0.1 CONFIG_PATH="$WORK/backend-slow.json" \
    "$BACKEND_BIN" >"$WORK/backend-slow.log" 2>&1 &
  PIDS+=("$!")
  await_200 "http://127.0.0.1:$slow/" "$!" "$WORK/backend-slow.log"
  for algorithm in round_robin least_request; do
    port p
    port admin
    cat >"$WORK/$algorithm.json" <<JSON
{
  "port": $p, "adminPort": $admin, "backendServiceName": "bench", "backendPort": $slow,
  "discovery": "static", "logLevel": "warn", "algorithm": "$algorithm",
  "staticBackends": ["127.0.0.1:${BACKEND_PORTS[0]}", "127.0.0.1:${BACKEND_PORTS[1]}", "127.0.0.1:$slow"]
}
JSON
    CONFIG_PATH="$WORK/$algorithm.json" "$LB_BIN" >"$WORK/$algorithm.log" 2>&1 &
    PIDS+=("$!")
    PID[$algorithm]="$!"
    URL[$algorithm]="http://127.0.0.1:$p"
    await_200 "http://127.0.0.1:$admin/readyz" "${PID[$algorithm]}" "$WORK/$algorithm.log"
  done
  run_scenario algorithms "$CONNECTIONS" "$ROUNDS" "/" round_robin least_request
  sed -i "s|^### algorithms: |### algorithms (one of three backends answers ${SLOW_BACKEND_MS} ms late): |" \
    "$WORK/algorithms.md"
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
for s in "${SCENARIOS[@]}"; do
  case "$s" in
    throughput) run_scenario throughput "$CONNECTIONS" "$ROUNDS" "/" "${PROXIES[@]}" ;;
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
    algorithms) run_algorithms ;;
    scale) run_scale ;;
  esac
done

# --- report ------------------------------------------------------------------

{
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $CORES cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), Linux $(uname -r)."
  if (( NEED_WRK )); then
    echo "Load generator: $(wrk -v 2>&1 | head -n 1 | awk '{ print $1, $2 }'), $WRK_THREADS threads, keep-alive, on the same cores."
    (( NEED_TLS )) && echo "HTTPS: one ECDSA P-256 certificate for all; wrk linked against $(ldd "$(command -v wrk)" | awk '/libssl/ { print $1; exit }')."
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
  # Soak and websocket on their own keep the block of the main run.
  block=run
  [[ "${SCENARIOS[*]}" == soak ]] && block=soak
  [[ "${SCENARIOS[*]}" == websocket ]] && block=websocket
  [[ "${SCENARIOS[*]}" == tls ]] && block=tls
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
