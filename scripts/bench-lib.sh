# shellcheck shell=bash
# Shared by scripts/bench.sh and scripts/instructions.sh (sourced, not run):
# installing what they measure with, filling in the peers' configuration
# templates (bench/), and checking that a gRPC call through a target ends
# well before its load is counted.
#
# The sourcing script defines `die MESSAGE` and `say MESSAGE`; before it calls
# `last_line` or `grpc_probe`, WORK names its run's directory, which holds
# `grpc-body.bin` (the 5-byte gRPC frame of an empty message), and GRPC_PATH
# the method that `grpc_probe` calls. `fill` reads the variables its comment
# names.

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

# fill TEMPLATE NAME=VALUE...: the template with each given @NAME@ replaced, and
# @WORK@ (WORK), @THREADS@ (CORES), @MAXCONN@ (MAXCONN), @KEEPALIVE@
# (H2_CONNECTIONS × H2_STREAMS), the backends' ports @B1@ to @B3@
# (BACKEND_PORTS) and the gRPC servers' HOST:PORT @G1@ to @G3@ (GRPC_ADDRS,
# which may be empty).
fill() {
  local template="$1" arg names=()
  shift
  for arg in "$@"; do names+=(-e "s|@${arg%%=*}@|${arg#*=}|g"); done
  sed "${names[@]}" -e "s|@WORK@|$WORK|g" -e "s|@THREADS@|$CORES|g" -e "s|@MAXCONN@|$MAXCONN|g" \
    -e "s|@KEEPALIVE@|$((H2_CONNECTIONS * H2_STREAMS))|g" \
    -e "s|@B1@|${BACKEND_PORTS[0]}|g" -e "s|@B2@|${BACKEND_PORTS[1]}|g" \
    -e "s|@B3@|${BACKEND_PORTS[2]}|g" -e "s|@G1@|${GRPC_ADDRS[0]:-}|g" \
    -e "s|@G2@|${GRPC_ADDRS[1]:-}|g" -e "s|@G3@|${GRPC_ADDRS[2]:-}|g" "$template"
}

# last_line LOG: the log's last non-empty line, cut to 300 characters, with the
# run's directory left out of the paths in it (the line goes into the report):
# why a process that was allowed to fail (h2 and grpc targets) did.
last_line() {
  awk -v work="$WORK/" 'NF { line = $0 }
    END { while ((i = index(line, work)) > 0) line = substr(line, 1, i - 1) substr(line, i + length(work))
          print substr(line, 1, 300) }' "$1"
}

# grpc_probe URL: one unary call to GRPC_PATH; prints why it failed, or nothing
# when the answer was 200 with grpc-status 0 in its trailers. h2load sees only
# the HTTP status, and a failed gRPC call is a 200 too (UNIMPLEMENTED, say).
grpc_probe() {
  local head rc=0 code grpc_status
  head="$(curl -sS --http2-prior-knowledge --max-time 5 -H 'content-type: application/grpc' \
    -H 'te: trailers' --data-binary @"$WORK/grpc-body.bin" -D - -o /dev/null "$1$GRPC_PATH" \
    2>"$WORK/curl.err")" || rc=$?
  if (( rc )); then
    echo "a gRPC call over h2c failed: $(last_line "$WORK/curl.err")"
    return
  fi
  code="$(awk 'NR == 1 { print $2 }' <<<"$head")"
  grpc_status="$(awk -F': *' 'tolower($1) == "grpc-status" { sub(/\r$/, "", $2); print $2 }' <<<"$head")"
  if [[ "$code" != 200 ]]; then
    echo "a gRPC call answered HTTP $code"
  elif [[ "$grpc_status" != 0 ]]; then
    echo "a gRPC call ended with grpc-status ${grpc_status:-(none)}$(awk -F': *' \
      'tolower($1) == "grpc-message" { sub(/\r$/, "", $2); print ": " $2 }' <<<"$head")"
  fi
}
