-- A cache purge (proxy/stores/generations.py): the field's next generation, above both what this store holds and what
-- the purger knows from elsewhere (ARGV[2]: this process's own view and the cache store's copy), so a store that
-- lost its hash never hands out a number some process already uses.
-- KEYS[1]: the generations hash. ARGV[1]: the field, ARGV[2]: the highest generation known elsewhere.
-- Reply: the new generation.
local held = redis.call('HGET', KEYS[1], ARGV[1])
local n = math.max(held and tonumber(held) or 0, tonumber(ARGV[2])) + 1
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', n))
return n
