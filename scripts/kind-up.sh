#!/usr/bin/env bash
# Brings the load balancer and its backends up on a local kind cluster, end to end:
#
#   1. checks that docker, kind, kubectl and curl are installed (and says which are not)
#   2. creates the kind cluster `loadbalancer-learning` from kind/cluster.yaml, unless
#      it exists (the config maps NodePorts 30080 and 30443 to localhost:8080 and 8443)
#   3. builds both images (names from the Makefile) and loads them into the cluster
#      with `kind load docker-image`, so no registry is needed
#   4. `kubectl apply -f k8s/` and waits for both rollouts (pods that ran an older
#      build of the same tag are restarted, so they pick up the new image)
#   5. smoke test: REQUESTS (default 30) requests to http://localhost:8080/ and
#      how many each backend pod answered
#
# Usage: scripts/kind-up.sh   (or `make kind-up`; `make kind-down` deletes the cluster)
#   env REQUESTS=N, CLUSTER=name, BACKEND_IMAGE=..., LOADBALANCER_IMAGE=...
set -euo pipefail
# Names this script in the messages of kind-lib.sh.
export SCRIPT=kind-up
# shellcheck source=scripts/kind-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/kind-lib.sh"
REQUESTS="${REQUESTS:-30}"

[[ "$REQUESTS" =~ ^[1-9][0-9]*$ ]] || die "REQUESTS must be a positive whole number, got '$REQUESTS'"
require docker kind kubectl curl
docker info >/dev/null 2>&1 || die "docker is installed but its daemon does not answer (is it running? may this user use it?)"
cd "$ROOT"

echo "==> Cluster $CLUSTER"
if cluster_exists; then
  echo "    exists, reusing it"
else
  kind create cluster --name "$CLUSTER" --config kind/cluster.yaml
fi

echo "==> Images $BACKEND_IMAGE and $LOADBALANCER_IMAGE"
docker build -f Dockerfile.backend -t "$BACKEND_IMAGE" .
docker build -f Dockerfile.loadbalancer -t "$LOADBALANCER_IMAGE" .
kind load docker-image --name "$CLUSTER" "$BACKEND_IMAGE" "$LOADBALANCER_IMAGE"

echo "==> Deploying k8s/"
# Deployments that already exist keep their pods on apply when the tag is unchanged;
# those pods run the previous build, so they are restarted after the apply.
existing="$(kubectl --context "$CONTEXT" get deployments -o name 2>/dev/null || true)"
kubectl --context "$CONTEXT" apply -f k8s/
for deployment in backend loadbalancer; do
  if grep -qx "deployment.apps/$deployment" <<<"$existing"; then
    kubectl --context "$CONTEXT" rollout restart "deployment/$deployment"
  fi
done
for deployment in backend loadbalancer; do
  kubectl --context "$CONTEXT" rollout status "deployment/$deployment" --timeout=180s
done

echo "==> Smoke test: $REQUESTS requests to http://localhost:8080/"
# The NodePort may take a moment to answer after the rollout; wait up to 30 s.
for attempt in $(seq 1 60); do
  curl -sf -o /dev/null --max-time 2 http://localhost:8080/ && break
  [[ "$attempt" -lt 60 ]] || die "nothing answers on localhost:8080 (check the port mapping in kind/cluster.yaml and 'kubectl --context $CONTEXT get svc')"
  sleep 0.5
done
declare -A answered=()
failed=0
for _ in $(seq 1 "$REQUESTS"); do
  body="$(curl -sf --max-time 5 http://localhost:8080/ || true)"
  pod="$(sed -n 's/.*"podName" *: *"\([^"]*\)".*/\1/p' <<<"$body")"
  if [[ -n "$pod" ]]; then
    answered[$pod]=$(( ${answered[$pod]:-0} + 1 ))
  else
    failed=$((failed + 1))
  fi
done
printf '    %-40s %8s\n' "backend pod" "requests"
for pod in $(printf '%s\n' "${!answered[@]}" | sort); do
  printf '    %-40s %8d\n' "$pod" "${answered[$pod]}"
done
[[ "$failed" -eq 0 ]] || printf '    %-40s %8d\n' "(failed)" "$failed"
echo
echo "Try: curl localhost:8080/   kubectl --context $CONTEXT logs -f deploy/loadbalancer"
echo "     kubectl --context $CONTEXT port-forward svc/loadbalancer-service 9090   (admin port)"
[[ "$failed" -eq 0 ]] || die "$failed of $REQUESTS requests failed"
