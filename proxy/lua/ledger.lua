-- Adds one flushed batch of a process's usage to one ledger hash, at most once.
-- KEYS[1]: the ledger hash (team, day). KEYS[2]: its flush marks, a hash: writer id -> last batch applied.
-- ARGV[1]: writer id (one per process), ARGV[2]: the batch's sequence number, ARGV[3]: retention in seconds,
-- then field, amount pairs. A writer sends its batches in order and retries each one, as itself, until Redis
-- acknowledges it; a batch at or below the writer's mark was applied already (the reply was lost to a timeout)
-- and is skipped, so a retried flush never counts twice. Reply: 1 applied, 0 skipped.
local seq = tonumber(ARGV[2])
local done = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if done >= seq then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], seq)
for i = 4, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
