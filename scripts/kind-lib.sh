# shellcheck shell=bash
# Shared by scripts/kind-up.sh and scripts/kind-down.sh (sourced, not run).
#
# The cluster name, the image names (read from the Makefile, which the manifest
# tests check against k8s/, so there is one place to change a tag), and a tool check
# that names every missing tool at once instead of failing on the first.

CLUSTER="${CLUSTER:-loadbalancer-learning}"
# kind names the kubectl context of cluster X "kind-X"; every kubectl call names it,
# so a different current context can never receive these manifests.
# shellcheck disable=SC2034 # used by the scripts that source this file
CONTEXT="kind-$CLUSTER"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# makefile_var NAME: the default the Makefile gives NAME (`NAME ?= value`).
makefile_var() {
  sed -n "s/^$1 ?= *//p" "$ROOT/Makefile"
}
BACKEND_IMAGE="${BACKEND_IMAGE:-$(makefile_var BACKEND_IMAGE)}"
LOADBALANCER_IMAGE="${LOADBALANCER_IMAGE:-$(makefile_var LOADBALANCER_IMAGE)}"

die() { echo "$SCRIPT: $*" >&2; exit 1; }

# require TOOL...: exits with one line per missing tool and where to get it.
require() {
  local tool missing=0
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 && continue
    missing=1
    case "$tool" in
      docker)  echo "$SCRIPT: docker is missing: https://docs.docker.com/engine/install/" >&2 ;;
      kind)    echo "$SCRIPT: kind is missing: https://kind.sigs.k8s.io/docs/user/quick-start/#installation" >&2 ;;
      kubectl) echo "$SCRIPT: kubectl is missing: https://kubernetes.io/docs/tasks/tools/" >&2 ;;
      openssl) echo "$SCRIPT: openssl is missing: install the openssl package (Debian/Ubuntu: apt-get install openssl)" >&2 ;;
      *)       echo "$SCRIPT: $tool is missing" >&2 ;;
    esac
  done
  [[ "$missing" -eq 0 ]] || exit 1
}

# cluster_exists: whether kind already runs our cluster.
cluster_exists() {
  kind get clusters 2>/dev/null | grep -qx "$CLUSTER"
}
