-- wrk script for the Tollgate benchmark: optional random key header, and a JSON summary line.
-- KEYS env: number of distinct x-key values (0 = no header); KEY env: one fixed x-key value;
-- CLOSE=1: send `Connection: close`, so every request opens a new connection (a new TLS
-- handshake over https; wrk keeps no TLS session to resume).
local keys = tonumber(os.getenv("KEYS") or "0")
local fixed = os.getenv("KEY")
local close = os.getenv("CLOSE") == "1"

function setup(thread)
  thread:set("id", math.random(1, 1000000))
end

function init(args)
  math.randomseed(os.time() + (id or 0))
end

function request()
  local headers = {}
  if close then
    headers["Connection"] = "close"
  end
  if fixed and fixed ~= "" then
    headers["x-key"] = fixed
  elseif keys > 0 then
    headers["x-key"] = "k" .. math.random(1, keys)
  end
  return wrk.format("GET", "/bench", headers)
end

function done(summary, latency, requests)
  io.write(string.format(
    'JSON {"requests":%d,"duration_us":%d,"non2xx":%d,"errors":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
