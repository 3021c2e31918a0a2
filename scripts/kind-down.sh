#!/usr/bin/env bash
# Deletes the kind cluster that scripts/kind-up.sh created, with everything in it.
# The images stay in the local Docker image store.
#
# Usage: scripts/kind-down.sh   (or `make kind-down`); env CLUSTER=name
set -euo pipefail
# Names this script in the messages of kind-lib.sh.
export SCRIPT=kind-down
# shellcheck source=scripts/kind-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/kind-lib.sh"

require kind
if cluster_exists; then
  kind delete cluster --name "$CLUSTER"
else
  echo "$SCRIPT: no kind cluster named $CLUSTER, nothing to delete"
fi
