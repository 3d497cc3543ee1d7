-- Adds one flushed batch of a process's usage to one month's roll-up, each day's part at most once, and only on top
-- of the writer's previous batch for that day.
-- KEYS[1]: the month's totals (field key_id|model|metric, as a ledger day's). KEYS[2]: the same month per day and
-- model (field YYYY-MM-DD|model|metric), with the roll-up's marks: `#YYYY-MM-DD|writer` -> the writer's last batch
-- rolled up for that day, `#v` -> a version bumped by every change (a rebuild writes only over the version it read).
-- ARGV[1]: writer id, ARGV[2]: the batch's sequence number, ARGV[3]: the roll-up's time to live in seconds, then per
-- day: the day, the writer's previous batch rolled up for that day (0: none), the number of its fields n, then n
-- field, amount pairs. The batch is the one ledger.lua applies to the days (same writer, same number, same
-- amounts): a day's part is skipped when its mark is at or above the batch, so a resent batch never counts twice.
-- It is applied only when the mark is the previous batch: a roll-up that lost a batch its days kept (a failover,
-- a restore) would otherwise take the next one and agree with the days without it. Such a day is marked -1, a mark
-- no day has, until a report rebuilds the month from its days. So a day's marks here equal its ledger flush marks
-- exactly when the roll-up holds that day's ledger hash (proxy/accounts/rollups.py checks this before a report
-- uses a roll-up). Reply: the number of days applied.
local writer, seq = ARGV[1], tonumber(ARGV[2])
local applied, changed = 0, false
local i = 4
while i <= #ARGV do
  local day, prev, n = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local mark = '#' .. day .. '|' .. writer
  local done = tonumber(redis.call('HGET', KEYS[2], mark) or '0')
  if done >= seq then
    -- applied already (a resent batch)
  elseif done == prev then
    redis.call('HSET', KEYS[2], mark, seq)
    for j = i + 3, i + 1 + 2 * n, 2 do
      redis.call('HINCRBY', KEYS[1], ARGV[j], ARGV[j + 1])
      redis.call('HINCRBY', KEYS[2], day .. '|' .. string.match(ARGV[j], '^[^|]*|(.*)$'), ARGV[j + 1])
    end
    applied, changed = applied + 1, true
  elseif done ~= -1 then
    redis.call('HSET', KEYS[2], mark, -1)
    changed = true
  end
  i = i + 3 + 2 * n
end
if changed then
  redis.call('HINCRBY', KEYS[2], '#v', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return applied
