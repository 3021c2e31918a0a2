-- wrk reporter for scripts/bench.sh: prints one machine-readable line at the end
-- of a run. Only `done` is defined, so wrk keeps its fast C path for every
-- request (a Lua `request`/`response` callback would cost more than a proxy hop
-- and hide the differences being measured).
--
-- Latencies are in microseconds. `err_status` is wrk's count of responses with a
-- status of 400 or more; the other error fields are socket errors.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d p50_us=%d p99_us=%d p999_us=%d " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.connect, e.read, e.write, e.status, e.timeout))
end
