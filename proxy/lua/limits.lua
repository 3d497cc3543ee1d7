-- One deployment's fleet-wide limits (proxy/stores/fleetlimits.py): a reservation per upstream call, in one round
-- trip. KEYS[1]: the deployment's budget hash, KEYS[2]: its leases (sorted set, member `lease|tokens|instance`,
-- score: when the lease expires), KEYS[3] (view only): its health hash (lua/health.lua). One hash tag: one slot.
-- Times are Redis's own clock (TIME). Budget hash fields: `r:S` / `t:S` requests and tokens reserved in second S
-- (kept 61 s: a call fits when what the last 61 whole seconds hold leaves room, so no minute, however it is
-- aligned, holds more than the limit); `p:INSTANCE` when that instance last reserved; `a`, `e`, `l`, `w` + `r`|`t`:
-- the upstream's announced remaining budget (minus what the fleet reserved since), its reset, limit and window.
-- A key, field or lease this script could not have written (wrong type, not a finite number, negative, over a day away:
-- anyone can write there) is dropped as it is read: never a script error (Redis taken for down) nor a deployment wedged.
-- op take: ARGV rpm, tpm, max_in_flight, tokens, lease, lease_s, instance, then the requests and tokens this instance
--   sent on its own share while Redis could not be asked (booked in this second first, whatever the reply: the
--   upstream counted them).
--   Reply {1, second, live, used_r, used_t, in_flight} or {0, reason (rpm|tpm|in_flight|requests|tokens),
--   wait_s as text, live, used_r, used_t, in_flight}: nothing is reserved then.
-- op done: ARGV lease member, tokens billed minus tokens reserved (booked while the lease is held: once), the
--   reservation's second, then the answer's announced remaining, reset_s and limit for requests and for tokens
--   ('' when not sent). Reply: 1.
-- op view: ARGV none. Reply {now, used_r, used_t, in_flight, budget fields..., '|', leases..., '|', health...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local sec = math.floor(now)
local op = ARGV[1]
local FAR = 86400  -- no lease, reset or window is longer: anything further is garbage (anyone can write there)
local function num(v)  -- a finite number, else nil: a field that holds anything else is dropped, never fatal
  local n = tonumber(v)
  if n and n == n and n > -math.huge and n < math.huge then return n end
  return nil
end
for i, kind in ipairs({'hash', 'zset', 'hash'}) do  -- a key of another type is garbage too: dropped
  local found = KEYS[i] and redis.call('TYPE', KEYS[i])['ok']
  if found and found ~= 'none' and found ~= kind then redis.call('DEL', KEYS[i]) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)  -- leases of calls that never said they were done
redis.call('ZREMRANGEBYSCORE', KEYS[2], '(' .. (now + FAR), '+inf')  -- nor would: they would hold a slot forever
local function in_flight()
  local count, tokens, bad = 0, 0, {}
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    local n = num(string.match(m, '^[^|]*|(%d+)|'))
    if n then
      count, tokens = count + 1, tokens + n
    else
      bad[#bad + 1] = m
    end
  end
  if #bad > 0 then redis.call('ZREM', KEYS[2], unpack(bad)) end
  return count, tokens
end
local h, stale, buckets, seen = {}, {}, {r = {}, t = {}}, {}
local used = {r = 0, t = 0}
local live, me = 0, 'p:' .. (ARGV[8] or '')
local raw = redis.call('HGETALL', KEYS[1])
for i = 1, #raw, 2 do
  local f, v = raw[i], raw[i + 1]
  local kind, rest = string.match(f, '^([rtp]):(.+)$')
  local n = num(v)
  if kind == 'p' then
    if not n or n < now - 60 or n > now + 1 then
      stale[#stale + 1] = f
    else
      seen[#seen + 1] = f; seen[#seen + 1] = v
      if f ~= me then live = live + 1 end
    end
  elseif kind then
    local s = num(rest)
    if not s or not n or n < 0 or s < sec - 60 or s > sec + 61 then
      stale[#stale + 1] = f
    else
      buckets[kind][s] = n
      used[kind] = used[kind] + n
    end
  else  -- the announced budget: a, e, l, w + r|t
    local first = string.sub(f, 1, 1)
    if not n or n < 0 or (first == 'e' and n > now + FAR) or (first == 'w' and n > FAR) then
      stale[#stale + 1] = f
    else
      h[f] = v
    end
  end
end
if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end

if op == 'view' then
  local count = in_flight()
  local reply = {string.format('%.6f', now), used.r, used.t, count}
  for f, v in pairs(h) do reply[#reply + 1] = f; reply[#reply + 1] = v end
  for _, v in ipairs(seen) do reply[#reply + 1] = v end
  reply[#reply + 1] = '|'
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do reply[#reply + 1] = m end
  reply[#reply + 1] = '|'
  for _, v in ipairs(redis.call('HGETALL', KEYS[3])) do reply[#reply + 1] = v end
  return reply
end

if op == 'done' then
  local held = redis.call('ZREM', KEYS[2], ARGV[2]) == 1  -- once: a `done` may be sent again after a blip
  local delta, s = num(ARGV[3]) or 0, num(ARGV[4])
  if held and delta ~= 0 and s and buckets.t[s] then  -- reconciled to what the upstream billed
    redis.call('HSET', KEYS[1], 't:' .. s, math.max(0, buckets.t[s] + delta))
  end
  local count, tokens = in_flight()  -- calls still in flight: most likely not counted yet by the upstream
  for i, d in ipairs({'r', 't'}) do
    local remaining, reset, limit = num(ARGV[2 + 3 * i]), num(ARGV[3 + 3 * i]), num(ARGV[4 + 3 * i])
    if reset then reset = math.min(math.max(reset, 0), FAR) end
    if remaining then
      reset = reset or 0
      local others = d == 'r' and count or tokens
      redis.call('HSET', KEYS[1], 'a' .. d, math.max(0, remaining - others), 'e' .. d,
                 string.format('%.6f', now + reset), 'w' .. d, math.max(tonumber(h['w' .. d]) or 0, reset))
      if limit then redis.call('HSET', KEYS[1], 'l' .. d, limit) end
    end
  end
  return 1
end

-- op take
for i, d in ipairs({'r', 't'}) do  -- calls sent on the instance's own share, unknown to the fleet until now
  local owed = tonumber(ARGV[8 + i]) or 0
  if owed > 0 then
    buckets[d][sec] = redis.call('HINCRBY', KEYS[1], d .. ':' .. sec, owed)
    used[d] = used[d] + owed
  end
end
local limits = {r = tonumber(ARGV[2]), t = tonumber(ARGV[3])}
local max_in_flight, tokens = tonumber(ARGV[4]), tonumber(ARGV[5])
local amounts = {r = 1, t = tokens}
local count = redis.call('ZCARD', KEYS[2])
local function refuse(reason, wait)
  return {0, reason, string.format('%.3f', wait), live + 1, used.r, used.t, count}
end
for _, d in ipairs({'r', 't'}) do  -- the configured limits: any 61 whole seconds hold at most the limit
  local limit, amount = limits[d], amounts[d]
  if limit > 0 and used[d] + amount > limit and (amount <= limit or used[d] > 0) then
    local need, freed = used[d] + amount - limit, 0
    for s = sec - 60, sec do
      freed = freed + (buckets[d][s] or 0)
      if freed >= need then return refuse(d == 'r' and 'rpm' or 'tpm', s + 61 - now) end
    end
    return refuse(d == 'r' and 'rpm' or 'tpm', 61)
  end
end
if max_in_flight > 0 and count >= max_in_flight then
  return refuse('in_flight', 0.05)  -- no time is known: the caller asks again shortly
end
local after = {}
for _, d in ipairs({'r', 't'}) do  -- the announced budget, as the upstream's headers left it for the fleet
  local remaining = tonumber(h['a' .. d])
  if remaining then
    local limit = tonumber(h['l' .. d])
    if now >= (tonumber(h['e' .. d]) or 0) then  -- its window has reset: the whole limit again, once
      remaining = limit
      h['e' .. d] = string.format('%.6f', now + (tonumber(h['w' .. d]) or 0))
      if limit then
        redis.call('HSET', KEYS[1], 'a' .. d, limit, 'e' .. d, h['e' .. d])
      else
        redis.call('HDEL', KEYS[1], 'a' .. d, 'e' .. d)  -- unknown until an answer's headers say
      end
    end
    if remaining and amounts[d] > remaining and not (limit and amounts[d] > limit and remaining == limit) then
      return refuse(d == 'r' and 'requests' or 'tokens', math.max(0.001, (tonumber(h['e' .. d]) or now) - now))
    end
    after[d] = remaining and math.max(0, remaining - amounts[d])
  end
end
for d, v in pairs(after) do redis.call('HSET', KEYS[1], 'a' .. d, v) end
redis.call('HINCRBY', KEYS[1], 'r:' .. sec, 1)
redis.call('HINCRBY', KEYS[1], 't:' .. sec, tokens)
redis.call('HSET', KEYS[1], 'p:' .. ARGV[8], string.format('%.6f', now))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), ARGV[6])
redis.call('EXPIRE', KEYS[1], 86400)
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')  -- the key lives as long as its longest lease
redis.call('EXPIREAT', KEYS[2], math.ceil(tonumber(last[2])) + 1)
return {1, sec, live + 1, used.r + 1, used.t + tokens, count + 1}
