-- Claims a gateway key's record for one rotation: sets its grace end only if the record is exactly as the rotation
-- read it (same revision, not revoked), and moves the revision on, so that of two concurrent rotations, or a rotation
-- and a revocation or limit change, one wins. One key: it works on a Redis Cluster too.
-- KEYS[1]: the record hash. ARGV[1]: the revision read ('' for none yet), ARGV[2]: the new grace end.
-- Reply: 1 claimed; 0 the record changed or is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local rev = redis.call('HGET', KEYS[1], 'rev') or ''
if rev ~= ARGV[1] or redis.call('HGET', KEYS[1], 'revoked') == '1' then
  return 0
end
redis.call('HSET', KEYS[1], 'grace_until', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'rev', 1)
return 1
