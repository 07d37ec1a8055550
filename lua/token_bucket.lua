--[[
Tollgate token buckets (GCRA form), decided atomically for every bucket of one request.

KEYS[i]   bucket key: {prefix}{route}:{limit}:{hash-tagged value}; all KEYS of one call share a slot.
ARGV[1]   mode: "decide" (charge all buckets only if every one admits), "peek" (charge nothing),
          or "refund" (give back `cost` tokens taken by an earlier "decide" of this request that
          another slot denied).
ARGV[2 + 3(i-1)]  interval_us: microseconds for one token to drip back (period / N of the rate)
ARGV[3 + 3(i-1)]  burst: bucket capacity in tokens
ARGV[4 + 3(i-1)]  cost: tokens this request takes from bucket i

Stored value per bucket: "tat:interval_us:burst", where tat (theoretical arrival time, in
microseconds of Redis TIME) is when the bucket will be full again. A bucket whose interval or
burst changed starts full. Each write sets the key's TTL to the time it takes to refill, so idle
buckets disappear. The clock is Redis TIME, never the caller's.

Returns integers: { all_allowed (1|0), then per bucket:
                    allowed (1|0), remaining tokens, reset_us (until full), retry_us (until this
                    cost fits; 0 when allowed), next_us (until the next whole token; 0 when full) }
"refund" returns { 1 }.
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]

local function stored_tat(key, interval, burst)
  local v = redis.call('GET', key)
  if v then
    local tat, i, b = string.match(v, '^(%d+):(%d+):(%d+)$')
    if tat and tonumber(i) == interval and tonumber(b) == burst then
      return tonumber(tat)
    end
  end
  return 0
end

local function store(key, tat, interval, burst)
  local ttl_ms = math.ceil((tat - now) / 1000)
  if ttl_ms <= 0 then
    redis.call('DEL', key)
  else
    redis.call('SET', key, string.format('%.0f:%.0f:%.0f', tat, interval, burst), 'PX', ttl_ms)
  end
end

local function next_token(debt, interval)
  if debt <= 0 then
    return 0
  end
  local partial = debt % interval
  if partial == 0 then
    return interval
  end
  return partial
end

if mode == 'refund' then
  for i = 1, #KEYS do
    local interval = tonumber(ARGV[2 + 3 * (i - 1)])
    local burst = tonumber(ARGV[3 + 3 * (i - 1)])
    local cost = tonumber(ARGV[4 + 3 * (i - 1)])
    local tat = stored_tat(KEYS[i], interval, burst)
    if tat > now then
      store(KEYS[i], math.max(tat - cost * interval, now), interval, burst)
    end
  end
  return { 1 }
end

local out = { 1 }
local new_tats = {}
local all_allowed = true
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 + 3 * (i - 1)])
  local burst = tonumber(ARGV[3 + 3 * (i - 1)])
  local cost = tonumber(ARGV[4 + 3 * (i - 1)])
  local tau = interval * burst
  local debt = math.min(math.max(stored_tat(KEYS[i], interval, burst) - now, 0), tau)
  local new_debt = debt + cost * interval
  local base = 2 + 5 * (i - 1)
  if new_debt <= tau then
    out[base] = 1
    out[base + 1] = math.floor((tau - new_debt) / interval)
    out[base + 2] = new_debt
    out[base + 3] = 0
    out[base + 4] = next_token(new_debt, interval)
    new_tats[i] = now + new_debt
  else
    all_allowed = false
    out[base] = 0
    out[base + 1] = math.floor((tau - debt) / interval)
    out[base + 2] = debt
    out[base + 3] = new_debt - tau
    out[base + 4] = next_token(debt, interval)
  end
end

if not all_allowed then
  out[1] = 0
elseif mode == 'decide' then
  for i = 1, #KEYS do
    local cost = tonumber(ARGV[4 + 3 * (i - 1)])
    if cost > 0 then
      store(KEYS[i], new_tats[i], tonumber(ARGV[2 + 3 * (i - 1)]), tonumber(ARGV[3 + 3 * (i - 1)]))
    end
  end
end
return out
