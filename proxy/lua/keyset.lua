-- Sets fields of a gateway key's record, only if the record is there: a key id whose record is gone must not
-- get a partial record (no id, no team) that every later read would fail on. Moves the record's revision on, so a
-- rotation that read it before this change does not go through (lua/keyrotate.lua).
-- KEYS[1]: the record hash. ARGV: field, value pairs. Reply: the record as it is now (HGETALL); empty: none.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
redis.call('HSET', KEYS[1], unpack(ARGV))
redis.call('HINCRBY', KEYS[1], 'rev', 1)
return redis.call('HGETALL', KEYS[1])
