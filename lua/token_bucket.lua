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
ARGV[4]   P, the number of distinct policies the call's buckets use; then P policies, each
            interval_ns  token bucket: nanoseconds for one token to drip back (the gateway's
                         integer interval, the same number the memory store uses); windows:
                         the window's length in nanoseconds (whole seconds)
            burst        bucket capacity in tokens; windows: the quota per window
            algorithm    0 token bucket (GCRA), 1 sliding window, 2 fixed window
          then for each request:
            n        the number of its buckets
            deadline Redis TIME in microseconds after which the request is not decided (its
                     caller has given up and used the fallback): 0 for none. In "refund"
                     mode: the refund's id (0: none); a refund whose id was already applied
                     to a bucket (marker key `{bucket key}#refund:{id}`, kept 10 min) is skipped
            charged  only in "refund" mode: the Redis TIME in microseconds of the call that
                     made the refunded charge (a window refund goes back to the window it was
                     charged in)
            debt     only in "refund" mode: a token bucket's debt (ns) right after that
                     charge, so the charge's tat is `charged` + `debt`. Only what the charge
                     still holds now (that tat minus now, at most cost * interval_ns) is given
                     back: once the bucket has refilled past it, time has paid the charge off,
                     and giving it back would erase a later request's charge (0 for windows)
            then one argument per bucket: "P" (its policy's position in the list above, from
            1, and cost 1) or "P*C" (cost C; the caller sends at most burst + 1: any cost
            above the burst can never fit)
          (The policies are sent once per call, not once per bucket: a batch's requests share
          a few limits, and every argument costs Redis a string to parse and intern.)

Precision: Lua numbers are doubles, exact for integers below 2^53. The gateway only accepts
policies whose full refill time interval_ns * burst is at most 2^53 ns (about 104 days), and
time is kept as whole seconds plus nanoseconds, never as one 1.8e18 ns timestamp, so every
value computed here is an exact integer and the script agrees with `src/limiter/gcra.rs` to the
nanosecond. Divisions use math.fmod, which is exact.

Windows (src/limiter/window.rs has the same arithmetic, its doc the definitions): window i
covers [i * W, (i + 1) * W) of Redis TIME. A fixed window admits while count + cost <= quota;
a sliding window while cur + ceil(prev * left_ms / W_ms) + cost <= quota, left_ms being what
is left of the current window in whole milliseconds (validation keeps quota * W_ms <= 2^53, so
every product here is exact). Stored value: "index:cur:prev:W_ns:quota:alg", with a TTL until
it counts nothing (the window's end; a sliding window's next window's end).

Stored value per token bucket: "tat_s:tat_ns:interval_ns:burst", where tat (theoretical arrival time,
in seconds and nanoseconds of Redis TIME) is when the bucket will be full again. A bucket whose
interval or burst changed, or stored in an older layout, starts full. Each write sets the key's
TTL to the time it takes to refill, so idle buckets disappear. The clock is Redis TIME, read
once per call, never the caller's.

Returns integers (all below 2^53): first Redis TIME as { seconds, microseconds }, then for
          decide/peek, for each request in order its status (1 every bucket admits: charged in
          "decide" mode; 0 some bucket denies: nothing charged; 2 deadline passed: nothing
          decided or charged, and nothing more for this request), then (status 0 or 1) per
          bucket its state as read, before this request's charge: a token bucket's debt (ns
          until full, at most interval_ns * burst), a window's counts in force (cur, prev).
          The gateway computes each bucket's outcome (remaining, reset, retry, next) from that
          state at this TIME with the memory store's arithmetic (src/limiter/gcra.rs and
          window.rs), which is what this script's decision is: returning states keeps the
          reply to 1 + 1 or 2 numbers per bucket, and no header value is computed here.
          refund and time: nothing more.
]]

local NS = 1000000000
-- Globals are table lookups in Lua 5.1; the script reads these as locals.
local fmod, ceil, tonumber, find, sub, format, call = math.fmod, math.ceil, tonumber,
  string.find, string.sub, string.format, redis.call
local argv = ARGV
-- tonumber of an argument, memoized: counts, costs and policy positions repeat in a call, and
-- each conversion is a strtod.
local small = setmetatable({}, { __index = function(memo, text)
  local v = tonumber(text)
  memo[text] = v
  return v
end })
local t = call('TIME')
local now_s = tonumber(t[1])
local now_ns = tonumber(t[2]) * 1000
local mode = argv[1]
-- Now in microseconds, as text: a deadline of the same length (every one from now until the
-- year 2286) is compared as text, digit by digit, without converting it (a strtod each).
local now_us_text = t[1] .. sub(t[2] + 1000000, 2)
local function past(deadline)
  if #deadline == #now_us_text then
    return deadline < now_us_text
  end
  return now_s * 1000000 + now_ns / 1000 > tonumber(deadline)
end
local decisions = tonumber(argv[2])

-- Buckets read in this call, and the ones changed: a bucket shared by several requests of a
-- batch is read once and written once, at the end.
local seen = {}
local dirty = {}
local dirty_order = {}

-- floor(a / b) for integers 0 <= a <= 2^53, b >= 1, exactly.
local function idiv(a, b)
  return (a - fmod(a, b)) / b
end

-- A token bucket as read in this call: `debt`, nanoseconds from now until it is full again
-- (its tat minus now, 0 when full or unknown), and `policy`, the stored ":interval_ns:burst".
-- Now is one instant for the whole call, so the debt stands for the tat until the write.
-- `policy` is ":interval_ns:burst" as the caller wrote them; comparing the stored suffix with
-- it is one plain string comparison. Returns the bucket's debt (0 when full or unknown).
local function stored_debt(key, policy)
  local b = seen[key]
  if b == nil then
    b = { debt = 0, policy = false }
    local v = call('GET', key)
    if v then
      local c1 = find(v, ':', 1, true)
      local c2 = c1 and find(v, ':', c1 + 1, true)
      if c2 then
        local d = ((tonumber(sub(v, 1, c1 - 1)) or 0) - now_s) * NS
          + ((tonumber(sub(v, c1 + 1, c2 - 1)) or 0) - now_ns)
        if d > 0 then
          b.debt = d
        end
        b.policy = sub(v, c2)
      end
    end
    seen[key] = b
  end
  if b.policy ~= policy then
    return 0
  end
  return b.debt
end

-- Sets a token bucket's debt (it must have been read, `stored_debt`, in this call).
local function store(key, d, policy)
  local b = seen[key]
  b.debt, b.policy, b.window = d, policy, false
  if not dirty[key] then
    dirty[key] = true
    dirty_order[#dirty_order + 1] = key
  end
end

local function flush()
  for _, key in ipairs(dirty_order) do
    local b = seen[key]
    if b.window then
      if b.cur == 0 and b.prev == 0 then
        call('DEL', key)
      else
        local ahead = 1
        if b.sliding then
          ahead = 2
        end
        local ttl_ms = ((b.idx + ahead) * b.ws - now_s) * 1000 - idiv(now_ns, 1000000)
        if ttl_ms < 1 then
          ttl_ms = 1
        end
        call('PSETEX', key, ttl_ms, format('%d:%d:%d%s', b.idx, b.cur, b.prev, b.policy))
      end
    else
    local d = b.debt
    if d <= 0 then
      call('DEL', key)
    else
      -- tat = now + d, as whole seconds and nanoseconds.
      local r = fmod(d, NS)
      local s = now_s + (d - r) / NS
      local ns = now_ns + r
      if ns >= NS then
        ns = ns - NS
        s = s + 1
      end
      -- `%d`: integer formatting, exact and much cheaper than a double's `%.0f` (or than
      -- `..`, which formats a number with `%.14g`). PSETEX: SET with PX, less to parse.
      call('PSETEX', key, format('%d', ceil(d / 1000000)), format('%d:%d%s', s, ns, b.policy))
    end
    end
  end
end

-- Token bucket refunds. A refund gives back at most what its charge still holds: the charge's
-- tat minus now, minus what refunds of earlier charges gave back to the bucket after this
-- charge was made (they lowered the debt every later request saw, and so what time had left of
-- this charge; a later charge's own charge and refund together never lower it). The ledger
-- `{bucket}#rf` lists recent refunds: "dropped_at:dropped_charged:dropped_sum" then
-- ";at:charged:amount" per refund (when it was given and when its charge was made, in
-- microseconds of Redis TIME; the amount in ns), at most LEDGER_MAX and none older than
-- REFUND_AGE_US. Entries the cap pushes out fold into `dropped` (their latest time given,
-- their earliest charge, their sum), counted whole against any charge made between the two. A charge older than REFUND_AGE_US is not refunded (the ledger no
-- longer covers it). Only refunds read or write the ledger.
local REFUND_AGE_US = 30000000
local LEDGER_MAX = 16

local function ledger_read(k, now_us)
  local led = { dat = 0, dcharged = 0, dsum = 0, n = 0 }
  -- A ledger that is not a string (written by something else) reads as empty; the next
  -- write replaces it.
  local v = redis.pcall('GET', k .. '#rf')
  if type(v) == 'string' then
    local head = true
    for a, b, m in string.gmatch(v, '(%d+):(%d+):(%d+)') do
      local at = tonumber(a)
      if head then
        led.dat, led.dcharged, led.dsum, head = at, tonumber(b), tonumber(m), false
      elseif now_us - at <= REFUND_AGE_US then
        led.n = led.n + 1
        led[led.n] = { at, tonumber(b), tonumber(m) }
      end
    end
  end
  if now_us - led.dat > REFUND_AGE_US then
    led.dat, led.dcharged, led.dsum = 0, 0, 0
  end
  return led
end

-- What refunds of charges made before `charged_us` gave back at or after it (when in doubt,
-- counted).
local function refunded_after(led, charged_us)
  local sum = 0
  if led.dsum > 0 and led.dat >= charged_us and led.dcharged <= charged_us then
    sum = led.dsum
  end
  for i = 1, led.n do
    local e = led[i]
    if e[1] >= charged_us and e[2] <= charged_us then
      sum = sum + e[3]
    end
  end
  return sum
end

local function ledger_add(k, led, now_us, charged_us, amount)
  led.n = led.n + 1
  led[led.n] = { now_us, charged_us, amount }
  local from = 1
  while led.n - from + 1 > LEDGER_MAX do
    local e = led[from]
    if led.dsum == 0 or e[2] < led.dcharged then
      led.dcharged = e[2]
    end
    if e[1] > led.dat then
      led.dat = e[1]
    end
    led.dsum = led.dsum + e[3]
    from = from + 1
  end
  local parts = { format('%d:%d:%d', led.dat, led.dcharged, led.dsum) }
  for i = from, led.n do
    local e = led[i]
    parts[#parts + 1] = format('%d:%d:%d', e[1], e[2], e[3])
  end
  call('PSETEX', k .. '#rf', REFUND_AGE_US / 1000, table.concat(parts, ';'))
end

-- Windows. `policy` is ":W_ns:quota:alg". Returns the window index now and the counts in
-- force (cur, prev), 0 for a bucket unknown or whose policy changed.
local function window_counts(key, policy, ws, sliding)
  local index = idiv(now_s, ws)
  local cached = seen[key]
  if cached == nil then
    cached = { window = true, idx = 0, cur = 0, prev = 0, policy = false }
    local v = call('GET', key)
    if v then
      local c1 = find(v, ':', 1, true)
      local c2 = c1 and find(v, ':', c1 + 1, true)
      local c3 = c2 and find(v, ':', c2 + 1, true)
      if c3 then
        cached.idx = tonumber(sub(v, 1, c1 - 1)) or 0
        cached.cur = tonumber(sub(v, c1 + 1, c2 - 1)) or 0
        cached.prev = tonumber(sub(v, c2 + 1, c3 - 1)) or 0
        cached.policy = sub(v, c3)
      end
    end
    seen[key] = cached
  end
  if cached.policy ~= policy or not cached.window then
    return index, 0, 0
  end
  local cur, prev = 0, 0
  -- A stored window ahead of now (Redis's clock stepped back, as after a failover to a node
  -- whose clock is behind) is the current one, counts kept: never a fresh quota.
  if cached.idx >= index then
    cur, prev = cached.cur, cached.prev
  elseif cached.idx + 1 == index then
    prev = cached.cur
  end
  if not sliding then
    prev = 0
  end
  return index, cur, prev
end

local function store_window(key, index, cur, prev, policy, ws, sliding)
  seen[key] = { window = true, idx = index, cur = cur, prev = prev, policy = policy,
    ws = ws, sliding = sliding }
  if not dirty[key] then
    dirty[key] = true
    dirty_order[#dirty_order + 1] = key
  end
end

-- ceil(prev * left_ms / w_ms), exactly (prev * left_ms <= 2^53).
local function weighted(prev, left_ms, w_ms)
  local p = prev * left_ms
  local q = idiv(p, w_ms)
  if fmod(p, w_ms) > 0 then
    q = q + 1
  end
  return q
end

-- The call's policies, by their position's spelling in ARGV ("1", "2", ...: a bucket's
-- reference is looked up as the string it arrives as): { suffix, interval, burst, tau, alg },
-- where suffix is ":interval_ns:burst" as the caller wrote them (the stored value's policy
-- part; a window's adds ":alg").
local policies_of = {}
local npolicies = tonumber(argv[4])
for i = 1, npolicies do
  local a_interval, a_burst, alg = argv[2 + 3 * i], argv[3 + 3 * i], argv[4 + 3 * i]
  local interval, burst = tonumber(a_interval), tonumber(a_burst)
  local suffix = ':' .. a_interval .. ':' .. a_burst
  if alg ~= '0' then
    suffix = suffix .. ':' .. alg
  end
  policies_of[tostring(i)] = { suffix, interval, burst, interval * burst, alg }
end

-- A bucket's argument, "P" (policy P, cost 1) or "P*C" (cost C), as { policy, cost };
-- memoized, as the same few spellings recur through a call.
local buckets_of = setmetatable({}, { __index = function(memo, text)
  local star = find(text, '*', 1, true)
  local b
  if star then
    b = { policies_of[sub(text, 1, star - 1)], tonumber(sub(text, star + 1)) }
  else
    b = { policies_of[text], 1 }
  end
  memo[text] = b
  return b
end })
local refunding = mode == 'refund'

local out = { tonumber(t[1]), tonumber(t[2]) }
local top = 2
local nkeys = tonumber(argv[3])
local keys = KEYS
if nkeys > 0 then
  keys = {}
  local base = #argv - nkeys
  for i = 1, nkeys do
    keys[i] = argv[base + i]
  end
end
local arg = 5 + 3 * npolicies
local key = 1
for _ = 1, decisions do
  local n = small[argv[arg]]
  local deadline = argv[arg + 1]
  local refund_id = deadline
  local charged_s, held, charged_us, now_us = 0, 0, 0, 0
  if refunding then
    charged_us = tonumber(argv[arg + 2])
    charged_s = idiv(charged_us, 1000000)
    -- ns the charge still holds, before other refunds: its tat (charged + debt) minus now.
    -- Exact: both sides in microseconds are below 2^53, and their difference is small.
    now_us = now_s * 1000000 + now_ns / 1000
    held = tonumber(argv[arg + 3]) - (now_us - charged_us) * 1000
    arg = arg + 2
  end
  arg = arg + 2
  if refunding then
    for i = 0, n - 1 do
      local b = buckets_of[argv[arg + i]]
      local p, cost = b[1], b[2]
      local policy, interval, alg = p[1], p[2], p[5]
      local k = keys[key + i]
      -- A refund is applied once: a retried one (its first try may have run after all) finds
      -- its marker, a key in the bucket's own slot, and does nothing.
      local first = true
      if refund_id ~= '0' then
        first = call('SET', k .. '#refund:' .. refund_id, '1', 'NX', 'PX', 600000)
      end
      if alg == '0' then
        local debt = stored_debt(k, policy)
        if first and debt > 0 and now_us - charged_us <= REFUND_AGE_US then
          -- What the charge still holds is at least its tat minus now minus the refunds of
          -- earlier charges given to this bucket since (the ledger's).
          local led = ledger_read(k, now_us)
          local back = cost * interval
          local most = held - refunded_after(led, charged_us)
          if back > most then
            back = most
          end
          if back > debt then
            back = debt
          end
          if back > 0 then
            store(k, debt - back, policy)
            ledger_add(k, led, now_us, charged_us, back)
          end
        end
      elseif first then
        -- Back to the window the charge was made in, if it still counts.
        local ws = interval / NS
        local sliding = alg == '1'
        local wpolicy = policy
        local index, cur, prev = window_counts(k, wpolicy, ws, sliding)
        local charged = idiv(charged_s, ws)
        if charged == index and cur > 0 then
          cur = math.max(cur - cost, 0)
          store_window(k, index, cur, prev, wpolicy, ws, sliding)
        elseif sliding and charged + 1 == index and prev > 0 then
          prev = math.max(prev - cost, 0)
          store_window(k, index, cur, prev, wpolicy, ws, sliding)
        end
      end
    end
  elseif deadline ~= '0' and past(deadline) then
    top = top + 1
    out[top] = 2
  else
    -- Each bucket's state as read (before any charge of this request), and whether every
    -- bucket admits.
    local head = top + 1
    top = head
    local all_allowed = true
    for i = 0, n - 1 do
      local b = buckets_of[argv[arg + i]]
      local p, cost = b[1], b[2]
      local policy, interval, burst, alg = p[1], p[2], p[3], p[5]
      if alg == '0' then
        local tau = p[4]
        local debt = stored_debt(keys[key + i], policy)
        if debt > tau then
          debt = tau
        end
        top = top + 1
        out[top] = debt
        if cost > burst or debt + cost * interval > tau then
          all_allowed = false
        end
      else
        local ws = interval / NS
        local _, cur, prev = window_counts(keys[key + i], policy, ws, alg == '1')
        out[top + 1] = cur
        out[top + 2] = prev
        top = top + 2
        if cost > burst then
          all_allowed = false
        else
          local w_ms = ws * 1000
          local left_ms = w_ms - (fmod(now_s, ws) * 1000 + idiv(now_ns, 1000000))
          if cur + weighted(prev, left_ms, w_ms) + cost > burst then
            all_allowed = false
          end
        end
      end
    end
    if not all_allowed then
      out[head] = 0
    else
      out[head] = 1
      if mode == 'decide' then
        local at = head
        for i = 0, n - 1 do
          local b = buckets_of[argv[arg + i]]
          local p, cost = b[1], b[2]
          if p[5] == '0' then
            at = at + 1
            if cost > 0 then
              store(keys[key + i], out[at] + cost * p[2], p[1])
            end
          else
            if cost > 0 then
              local ws = p[2] / NS
              store_window(keys[key + i], idiv(now_s, ws), out[at + 1] + cost, out[at + 2], p[1],
                ws, p[5] == '1')
            end
            at = at + 2
          end
        end
      end
    end
  end
  arg = arg + n
  key = key + n
end
flush()
return out
