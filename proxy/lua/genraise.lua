-- Raises generations to at least the given values, never lowers one (proxy/stores/generations.py): a process puts back
-- what a store lost, or copies a purge to the cache store, without undoing a purge that landed meanwhile.
-- KEYS[1]: the generations hash. ARGV: field, generation pairs. Reply: how many fields were raised.
local raised = 0
for i = 1, #ARGV, 2 do
  local held = redis.call('HGET', KEYS[1], ARGV[i])
  local want = tonumber(ARGV[i + 1])
  if (held and tonumber(held) or -1) < want then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    raised = raised + 1
  end
end
return raised
