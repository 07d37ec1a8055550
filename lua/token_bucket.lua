--[[
Tollgate token buckets (GCRA form). One call decides a batch of requests; each request's
buckets are decided together, atomically and all-or-nothing, in the order given.

KEYS      every bucket key of every request, in order: {prefix}{route}:{limit}:{hash-tagged value}
          (standalone, sentinel). In a Redis Cluster only the first bucket key, which routes the
          call to its node; all the keys then come at the end of ARGV (see ARGV[3]). The Cluster
          variant of this script starts with `#!lua flags=allow-cross-slot-keys` (Redis 7+), so
          one call can decide buckets of several slots as long as one node serves them all.
ARGV[1]   mode: "decide" (charge a request's buckets only if every one admits), "peek" (charge
          nothing), "refund" (give back `cost` tokens taken by an earlier "decide" whose
          request another slot denied, or whose caller had given up), or "time" (only the clock).
ARGV[2]   D, the number of requests in the batch.
ARGV[3]   K, how many bucket keys are at the end of ARGV (0: the keys are KEYS).
ARGV[4..] for each request:
            n        the number of its buckets
            deadline Redis TIME in microseconds after which the request is not decided (its
                     caller has given up and used the fallback): 0 for none. In "refund"
                     mode: the refund's id (0: none); a refund whose id was already applied
                     to a bucket (marker key `{bucket key}#refund:{id}`, kept 10 min) is skipped
            then for each bucket:
            interval_ns  nanoseconds for one token to drip back (the gateway's integer
                         interval, the same number the memory store uses)
            burst        bucket capacity in tokens
            cost         tokens this request takes (the caller sends at most burst + 1: any
                         cost above the burst can never fit)

Precision: Lua numbers are doubles, exact for integers below 2^53. The gateway only accepts
policies whose full refill time interval_ns * burst is at most 2^53 ns (about 104 days), and
time is kept as whole seconds plus nanoseconds, never as one 1.8e18 ns timestamp, so every
value computed here is an exact integer and the script agrees with `src/limiter/gcra.rs` to the
nanosecond. Divisions use math.fmod, which is exact.

Stored value per bucket: "tat_s:tat_ns:interval_ns:burst", where tat (theoretical arrival time,
in seconds and nanoseconds of Redis TIME) is when the bucket will be full again. A bucket whose
interval or burst changed, or stored in an older layout, starts full. Each write sets the key's
TTL to the time it takes to refill, so idle buckets disappear. The clock is Redis TIME, read
once per call, never the caller's.

Returns integers (all below 2^53): first Redis TIME as { seconds, microseconds }, then for
          decide/peek, for each request in order
            { status (1 all allowed, 0 denied, 2 deadline passed: nothing decided or charged), then per bucket: allowed (1|0), remaining tokens,
              reset_ns (until full), retry_ns (until this cost fits; 0 when allowed, and 0
              when the cost exceeds the burst: it never fits), next_ns (until the next whole
              token; 0 when full) }
          When a request is denied, its buckets that would have admitted report their state
          uncharged (what they really hold), not what they would have held after the charge.
          refund and time: nothing more.
]]

local NS = 1000000000
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ns = tonumber(t[2]) * 1000
local mode = ARGV[1]
local decisions = tonumber(ARGV[2])

-- Buckets read in this call, and the ones changed: a bucket shared by several requests of a
-- batch is read once and written once, at the end.
local seen = {}
local dirty = {}
local dirty_order = {}

-- floor(a / b) for integers 0 <= a <= 2^53, b >= 1, exactly.
local function idiv(a, b)
  return (a - math.fmod(a, b)) / b
end

-- Nanoseconds from now until the bucket's tat (negative when in the past).
local function debt_of(b)
  return (b.s - now_s) * NS + (b.ns - now_ns)
end

-- The bucket entry whose tat is `d` (0 <= d <= 2^53) nanoseconds from now.
local function at(d, policy)
  local r = math.fmod(d, NS)
  local s = now_s + (d - r) / NS
  local ns = now_ns + r
  if ns >= NS then
    ns = ns - NS
    s = s + 1
  end
  return { s = s, ns = ns, policy = policy }
end

-- `policy` is ":interval_ns:burst" as the caller wrote them; comparing the stored suffix with
-- it is one plain string comparison. Returns the bucket's debt (0 when full or unknown).
local function stored_debt(key, policy)
  local cached = seen[key]
  if cached == nil then
    cached = { s = 0, ns = 0, policy = false }
    local v = redis.call('GET', key)
    if v then
      local c1 = string.find(v, ':', 1, true)
      local c2 = c1 and string.find(v, ':', c1 + 1, true)
      if c2 then
        cached.s = tonumber(string.sub(v, 1, c1 - 1)) or 0
        cached.ns = tonumber(string.sub(v, c1 + 1, c2 - 1)) or 0
        cached.policy = string.sub(v, c2)
      end
    end
    seen[key] = cached
  end
  if cached.policy ~= policy then
    return 0
  end
  local d = debt_of(cached)
  if d < 0 then
    return 0
  end
  return d
end

local function store(key, d, policy)
  seen[key] = at(d, policy)
  if not dirty[key] then
    dirty[key] = true
    dirty_order[#dirty_order + 1] = key
  end
end

local function flush()
  for _, key in ipairs(dirty_order) do
    local b = seen[key]
    local d = debt_of(b)
    if d <= 0 then
      redis.call('DEL', key)
    else
      local ttl_ms = math.ceil(d / 1000000)
      redis.call('SET', key,
        string.format('%.0f:%.0f', b.s, b.ns) .. b.policy, 'PX', ttl_ms)
    end
  end
end

local function next_token(debt, interval)
  if debt <= 0 then
    return 0
  end
  local partial = math.fmod(debt, interval)
  if partial == 0 then
    return interval
  end
  return partial
end

local out = { tonumber(t[1]), tonumber(t[2]) }
local nkeys = tonumber(ARGV[3])
local keys = KEYS
if nkeys > 0 then
  keys = {}
  local base = #ARGV - nkeys
  for i = 1, nkeys do
    keys[i] = ARGV[base + i]
  end
end
local arg = 4
local key = 1
for _ = 1, decisions do
  local n = tonumber(ARGV[arg])
  local deadline = tonumber(ARGV[arg + 1])
  local refund_id = ARGV[arg + 1]
  arg = arg + 2
  if mode == 'refund' then
    for i = 0, n - 1 do
      local interval = tonumber(ARGV[arg + 3 * i])
      local policy = ':' .. ARGV[arg + 3 * i] .. ':' .. ARGV[arg + 3 * i + 1]
      local cost = tonumber(ARGV[arg + 3 * i + 2])
      local k = keys[key + i]
      local debt = stored_debt(k, policy)
      -- A refund is applied once: a retried one (its first try may have run after all) finds
      -- its marker, a key in the bucket's own slot, and does nothing.
      local first = true
      if refund_id ~= '0' then
        first = redis.call('SET', k .. '#refund:' .. refund_id, '1', 'NX', 'PX', 600000)
      end
      if first and debt > 0 then
        local back = cost * interval
        if back > debt then
          back = debt
        end
        store(k, debt - back, policy)
      end
    end
  elseif deadline > 0 and now_s * 1000000 + now_ns / 1000 > deadline then
    out[#out + 1] = 2
    for _ = 1, 5 * n do
      out[#out + 1] = 0
    end
  else
    local head = #out + 1
    out[head] = 1
    local all_allowed = true
    local debts = {}
    local intervals = {}
    local taus = {}
    local policies = {}
    for i = 0, n - 1 do
      local interval = tonumber(ARGV[arg + 3 * i])
      local burst = tonumber(ARGV[arg + 3 * i + 1])
      local cost = tonumber(ARGV[arg + 3 * i + 2])
      local policy = ':' .. ARGV[arg + 3 * i] .. ':' .. ARGV[arg + 3 * i + 1]
      local tau = interval * burst
      local debt = stored_debt(keys[key + i], policy)
      if debt > tau then
        debt = tau
      end
      debts[i], intervals[i], taus[i], policies[i] = debt, interval, tau, policy
      local base = head + 1 + 5 * i
      local room = tau - debt
      local need = 0
      if cost <= burst then
        need = cost * interval
      end
      if cost <= burst and need <= room then
        local new_debt = debt + need
        out[base] = 1
        out[base + 1] = idiv(tau - new_debt, interval)
        out[base + 2] = new_debt
        out[base + 3] = 0
        out[base + 4] = next_token(new_debt, interval)
      else
        all_allowed = false
        out[base] = 0
        out[base + 1] = idiv(room, interval)
        out[base + 2] = debt
        -- A cost above the burst never fits: no retry time.
        out[base + 3] = 0
        if cost <= burst then
          out[base + 3] = need - room
        end
        out[base + 4] = next_token(debt, interval)
      end
    end
    if not all_allowed then
      out[head] = 0
      -- Nothing is charged: the buckets that admitted report what they really hold.
      for i = 0, n - 1 do
        local base = head + 1 + 5 * i
        if out[base] == 1 then
          out[base + 1] = idiv(taus[i] - debts[i], intervals[i])
          out[base + 2] = debts[i]
          out[base + 4] = next_token(debts[i], intervals[i])
        end
      end
    elseif mode == 'decide' then
      for i = 0, n - 1 do
        if tonumber(ARGV[arg + 3 * i + 2]) > 0 then
          store(keys[key + i], out[head + 1 + 5 * i + 2], policies[i])
        end
      end
    end
  end
  arg = arg + 3 * n
  key = key + n
end
flush()
return out
