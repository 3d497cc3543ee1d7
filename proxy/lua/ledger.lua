-- Adds one flushed batch of a process's usage to one ledger hash, at most once.
-- KEYS[1]: the ledger hash (team, day). KEYS[2]: its flush marks, a hash: writer id -> last batch applied.
-- ARGV[1]: writer id (one per process), ARGV[2]: the batch's sequence number, ARGV[3]: retention in seconds,
-- ARGV[4]: the writer's previous batch applied to this hash as far as it knows (0: none), then field, amount
-- pairs. A writer sends its batches in order and retries each one, as itself, until Redis acknowledges it; a batch at or below the writer's mark was applied already (the reply was lost to a timeout)
-- and is skipped, so a retried flush never counts twice. Reply: 1 applied, 0 skipped.
local seq, prev = tonumber(ARGV[2]), tonumber(ARGV[4])
local done = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if done >= seq then
  return 0
end
if done == 0 and redis.call('EXISTS', KEYS[2]) == 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  -- fields written without flush marks (by a ledger without them): a mark says so, '-' -> 0, so that a month
  -- roll-up holding this writer's batches but not those fields never agrees with this day (rollups.py)
  redis.call('HSET', KEYS[2], '-', 0)
end
if done ~= prev then
  -- the hash lost a batch of this writer that its month's roll-up may hold (a failover, a restore), or the writer
  -- forgot: a mark no roll-up has ('!' -> this batch), so the month is read from its days until a report rebuilds it
  redis.call('HSET', KEYS[2], '!', seq)
end
redis.call('HSET', KEYS[2], ARGV[1], seq)
for i = 5, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
