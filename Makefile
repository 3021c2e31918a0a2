# Thin wrappers: each target calls cargo, docker or a script and nothing more, so
# what `make X` does is always one short read away.

# Image names; the Kubernetes manifests under k8s/ use the same tags.
BACKEND_IMAGE ?= backend:0.1.0
LOADBALANCER_IMAGE ?= loadbalancer:0.1.0

.PHONY: help demo test run-backend fmt lint doc image-backend image-loadbalancer images kind-up kind-down tls-cert bench instructions

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# `make demo REQUESTS=90`, `make demo PROFILE=release`
demo: ## local demo with no cluster: three backends, the load balancer, the distribution
	REQUESTS=$(or $(REQUESTS),30) PROFILE=$(or $(PROFILE),debug) bash scripts/demo.sh

test: ## every test in the workspace
	cargo test --workspace --locked

run-backend: ## one backend on :8080 with backend/config.json (Ctrl-C stops it)
	cargo run -p backend -- --config backend/config.json

fmt: ## format all code
	cargo fmt --all

lint: ## what CI checks besides the tests
	cargo fmt --all --check
	cargo clippy --all-targets --locked -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items --locked

# The private modules are most of each crate, so they are documented too.
doc: ## the crates' documentation, private modules included, opened in a browser
	cargo doc --workspace --no-deps --document-private-items --locked --open

# Without a Docker engine, any OCI builder can build it: buildah bud -f Dockerfile.backend .
image-backend: ## build the backend image $(BACKEND_IMAGE)
	docker build -f Dockerfile.backend -t $(BACKEND_IMAGE) .

# Without a Docker engine, any OCI builder can build it: buildah bud -f Dockerfile.loadbalancer .
image-loadbalancer: ## build the load balancer image $(LOADBALANCER_IMAGE)
	docker build -f Dockerfile.loadbalancer -t $(LOADBALANCER_IMAGE) .

images: ## build both images, after checking that docker is installed
	@SCRIPT="make images" bash -c 'source scripts/kind-lib.sh && require docker'
	@$(MAKE) --no-print-directory image-backend image-loadbalancer

# The kind cluster `loadbalancer-learning` with both images and everything in k8s/.
# Each script checks for docker, kind and kubectl first and names what is missing.
kind-up: ## create the kind cluster, load the images, deploy k8s/, smoke-test localhost:8080
	BACKEND_IMAGE=$(BACKEND_IMAGE) LOADBALANCER_IMAGE=$(LOADBALANCER_IMAGE) bash scripts/kind-up.sh

kind-down: ## delete the kind cluster
	bash scripts/kind-down.sh

# For `kubectl create secret tls loadbalancer-tls --cert=tls/tls.crt --key=tls/tls.key`
# (docs/kubernetes.md, "TLS"). tls/ is git-ignored: the key must never be committed.
# CA:FALSE: OpenSSL marks an -x509 certificate CA:TRUE by default, and clients built
# on rustls (webpki) refuse such a certificate from a server (CaUsedAsEndEntity).
tls-cert: ## self-signed ECDSA P-256 certificate and key for localhost in tls/ (30 days)
	@SCRIPT="make tls-cert" bash -c 'source scripts/kind-lib.sh && require openssl'
	mkdir -p tls
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
		-subj /CN=localhost \
		-addext "subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:loadbalancer-service.default.svc" \
		-addext "basicConstraints=critical,CA:FALSE" \
		-keyout tls/tls.key -out tls/tls.crt

# `make bench`, `make bench SCENARIO=soak`, `make bench SCENARIO=websocket`,
# `make bench SCENARIO=tls`, `make bench SCENARIO=h2,grpc` (h2load, HTTP/2 and gRPC),
# `make bench SCENARIO=policy` (affinity and a rate limit against round robin),
# `make bench SCENARIO=idle,idle-tls` (idle clients, plain and over HTTPS),
# `make bench DURATION=10 ROUNDS=5`: make exports command-line variables, and
# scripts/bench.sh reads them (see its header for the scenarios).
bench: ## benchmark against nginx and HAProxy (about 2 minutes; SCENARIO=churn, idle, idle-tls, soak, algorithms, policy, websocket, tls, h2,grpc or scale for more); writes docs/bench-results.md
	bash scripts/bench.sh

# `make instructions LB_BIN=path/to/an/older/loadbalancer` counts another build,
# `make instructions PEER=nginx` (haproxy, nginx-plain, haproxy-plain) a peer.
instructions: ## user-space instructions per proxied request, by cachegrind: steady where times are noisy (about a minute; PROTOCOL=churn for a new connection per request, h2 or grpc for HTTP/2 clients; PEER=nginx, haproxy, nginx-plain or haproxy-plain to count a peer)
	bash scripts/instructions.sh
