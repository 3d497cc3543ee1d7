-- Seeds the in-process quota store (the fallback while Redis is unreachable) with the last values this process
-- saw in Redis, so that a counter starts where Redis stood rather than at zero.
-- KEYS[i]: counter i, ARGV[2i-1]: its last value seen in Redis, ARGV[2i]: unix time it expires at.
-- A counter is only raised, never lowered: what this process charged locally in an earlier outage of the same
-- window stays counted.
for i = 1, #KEYS do
  local seen = tonumber(ARGV[2 * i - 1])
  if tonumber(redis.call('GET', KEYS[i]) or '0') < seen then
    redis.call('SET', KEYS[i], seen)
    redis.call('EXPIREAT', KEYS[i], ARGV[2 * i])
  end
end
return 1
