.PHONY: demo

# Local demo: three backends and the load balancer on this machine, N requests,
# the distribution per pod. `make demo REQUESTS=90`, `make demo PROFILE=release`.
demo:
	REQUESTS=$(or $(REQUESTS),30) PROFILE=$(or $(PROFILE),debug) bash scripts/demo.sh
