-- wrk script for the policy scenario of scripts/bench.sh: GET / with a
-- different `X-User` header on each request, the users taken in turn from
-- 10,000 (user-0 to user-9999, each wrk thread counting on its own), so that the
-- affinity runs hash a new key every time and spread it over the three backends
-- as many users would, rather than pinning every request to one backend.
--
-- wrk can vary a header only from a Lua `request` callback, which costs wrk more
-- than its fixed request (see bench/report.lua). So the scenario sends this
-- script to every one of its targets, round-robin and rate limit included (they
-- ignore the header): the load generator does the same work in every row and
-- each ratio shows the proxy's cost alone. The requests are formatted once, in
-- `init`; the callback only hands out the next one.
--
-- The reporter (`done`) is bench/report.lua's; wrk runs from the repository's
-- root, which the script changes to.
dofile("bench/report.lua")

local users = 10000
local requests = {}
local next_user = 0

init = function(args)
  for i = 0, users - 1 do
    requests[i] = wrk.format(nil, nil, { ["X-User"] = "user-" .. i })
  end
end

request = function()
  local r = requests[next_user]
  next_user = (next_user + 1) % users
  return r
end
