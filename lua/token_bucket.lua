--[[
Tollgate token buckets (GCRA form). One call decides a batch of requests; each request's
buckets are decided together, atomically and all-or-nothing, in the order given.

KEYS      every bucket key of every request, in order: {prefix}{route}:{limit}:{hash-tagged value}.
          In Redis Cluster all KEYS of one call share a slot.
ARGV[1]   mode: "decide" (charge a request's buckets only if every one admits), "peek" (charge
          nothing), "refund" (give back `cost` tokens taken by an earlier "decide" whose
          request another slot denied, or whose caller had given up), or "time" (only the clock).
ARGV[2]   D, the number of requests in the batch; then for each request:
            n        the number of its buckets
            deadline Redis TIME in microseconds after which the request is not decided (its
                     caller has given up and used the fallback): 0 for none
            then for each bucket:
            interval_us  microseconds for one token to drip back (period / N of the rate)
            burst        bucket capacity in tokens
            cost         tokens this request takes

Stored value per bucket: "tat:interval_us:burst", where tat (theoretical arrival time, in
microseconds of Redis TIME) is when the bucket will be full again. A bucket whose interval or
burst changed starts full. Each write sets the key's TTL to the time it takes to refill, so idle
buckets disappear. The clock is Redis TIME, read once per call, never the caller's.

Returns integers: first Redis TIME as { seconds, microseconds }, then for decide/peek, for each
          request in order
            { status (1 all allowed, 0 denied, 2 deadline passed: nothing charged), then per bucket: allowed (1|0), remaining tokens,
              reset_us (until full), retry_us (until this cost fits; 0 when allowed),
              next_us (until the next whole token; 0 when full) }
          refund and time: nothing more.
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
local decisions = tonumber(ARGV[2])

-- Buckets read in this call, and the ones changed: a bucket shared by several requests of a
-- batch is read once and written once, at the end.
local seen = {}
local dirty = {}
local dirty_order = {}

-- `policy` is ":interval_us:burst" as the caller wrote them; comparing the stored suffix with it
-- is one plain string comparison.
local function stored_tat(key, policy)
  local cached = seen[key]
  if cached == nil then
    cached = { tat = 0, policy = false }
    local v = redis.call('GET', key)
    if v then
      local colon = string.find(v, ':', 1, true)
      if colon then
        cached.tat = tonumber(string.sub(v, 1, colon - 1))
        cached.policy = string.sub(v, colon)
      end
    end
    seen[key] = cached
  end
  if cached.policy == policy then
    return cached.tat
  end
  return 0
end

local function store(key, tat, policy)
  seen[key] = { tat = tat, policy = policy }
  if not dirty[key] then
    dirty[key] = true
    dirty_order[#dirty_order + 1] = key
  end
end

local function flush()
  for _, key in ipairs(dirty_order) do
    local b = seen[key]
    local ttl_ms = math.ceil((b.tat - now) / 1000)
    if ttl_ms <= 0 then
      redis.call('DEL', key)
    else
      redis.call('SET', key, string.format('%.0f', b.tat) .. b.policy, 'PX', ttl_ms)
    end
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

local out = { tonumber(t[1]), tonumber(t[2]) }
local arg = 3
local key = 1
for _ = 1, decisions do
  local n = tonumber(ARGV[arg])
  local deadline = tonumber(ARGV[arg + 1])
  arg = arg + 2
  if mode == 'refund' then
    for i = 0, n - 1 do
      local interval = tonumber(ARGV[arg + 3 * i])
      local policy = ':' .. ARGV[arg + 3 * i] .. ':' .. ARGV[arg + 3 * i + 1]
      local cost = tonumber(ARGV[arg + 3 * i + 2])
      local k = KEYS[key + i]
      local tat = stored_tat(k, policy)
      if tat > now then
        store(k, math.max(tat - cost * interval, now), policy)
      end
    end
  elseif deadline > 0 and now > deadline then
    out[#out + 1] = 2
    for _ = 1, 5 * n do
      out[#out + 1] = 0
    end
  else
    local head = #out + 1
    out[head] = 1
    local all_allowed = true
    local new_tats = {}
    local policies = {}
    for i = 0, n - 1 do
      local interval = tonumber(ARGV[arg + 3 * i])
      local burst = tonumber(ARGV[arg + 3 * i + 1])
      local cost = tonumber(ARGV[arg + 3 * i + 2])
      local policy = ':' .. ARGV[arg + 3 * i] .. ':' .. ARGV[arg + 3 * i + 1]
      policies[i] = policy
      local tau = interval * burst
      local debt = tau
      local tat = stored_tat(KEYS[key + i], policy)
      if tat - now < tau then
        debt = tat - now
        if debt < 0 then
          debt = 0
        end
      end
      local new_debt = debt + cost * interval
      local base = head + 1 + 5 * i
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
      out[head] = 0
    elseif mode == 'decide' then
      for i = 0, n - 1 do
        if tonumber(ARGV[arg + 3 * i + 2]) > 0 then
          store(KEYS[key + i], new_tats[i], policies[i])
        end
      end
    end
  end
  arg = arg + 3 * n
  key = key + n
end
flush()
return out
