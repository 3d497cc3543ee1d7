-- Writes a month's roll-up rebuilt from its ledger days, unless it changed since the rebuild began.
-- KEYS[1], KEYS[2]: as in rollup.lua. ARGV[1]: the version (`#v`) the rebuild read before reading the days ('0':
-- none), ARGV[2]: time to live in seconds, ARGV[3]: the number n of totals, then n field, value pairs for KEYS[1],
-- then field, value pairs for KEYS[2] (per day and model, and the days' marks). Reply: 1 written, 0 changed meanwhile.
if (redis.call('HGET', KEYS[2], '#v') or '0') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
local n = tonumber(ARGV[3])
for i = 4, 3 + 2 * n, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
for i = 4 + 2 * n, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[2], '#v', tonumber(ARGV[1]) + 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
