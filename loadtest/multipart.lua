-- wrk script for loadtest/wrk.py: POST prepared request bodies in turn and count every answer that is
-- not 2xx. Arguments (after wrk's "--"): the folder holding body-1.bin, body-2.bin, ... (each a whole
-- body, written by loadtest/wrk.py), their Content-Type, and any more headers as "Name: value" (the Open
-- Inference Protocol's Inference-Header-Content-Length, an Authorization).
-- Each wrk thread runs its own Lua state; setup() and done() run in a third one.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("id", #threads)
end

function init(args)
   local headers = {["Content-Type"] = args[2]}
   local extra = 3
   while args[extra] do
      local name, value = args[extra]:match("^([^:]+):%s*(.*)$")
      headers[name] = value
      extra = extra + 1
   end
   requests, non2xx = {}, 0
   local i = 1
   while true do
      local f = io.open(args[1] .. "/body-" .. i .. ".bin", "rb")
      if not f then break end
      table.insert(requests, wrk.format("POST", nil, headers, f:read("*a")))
      f:close()
      i = i + 1
   end
   assert(#requests > 0, "no body files in " .. args[1])
   next_one = id % #requests  -- threads start at different bodies
end

function request()
   next_one = next_one % #requests + 1
   return requests[next_one]
end

function response(status, headers, body)
   if status < 200 or status > 299 then non2xx = non2xx + 1 end
end

function done(summary, latency)
   local non2xx = 0
   for _, thread in ipairs(threads) do non2xx = non2xx + thread:get("non2xx") end
   local e = summary.errors
   io.write(string.format(
      'convserve-wrk {"requests": %d, "duration_us": %d, "non_2xx": %d, "connect": %d, "read": %d, ' ..
      '"write": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
      summary.requests, summary.duration, non2xx, e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
