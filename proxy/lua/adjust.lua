-- Corrects quota counters after the fact: a refund (negative) or the upstream's own count (either sign).
-- KEYS[i]: counter i, ARGV[i]: the amount to add. A counter whose window has already expired is left alone,
-- so a late refund never creates a key without an expiry. Values never go below zero.
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local value = redis.call('INCRBY', KEYS[i], ARGV[i])
    if value < 0 then
      redis.call('INCRBY', KEYS[i], -value)
    end
  end
end
return 1
