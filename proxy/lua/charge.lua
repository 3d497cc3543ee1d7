-- Atomic check-and-reserve for quota counters (fixed windows).
-- KEYS[i]: counter i.  ARGV[3i-2]: its limit, ARGV[3i-1]: the amount to add, ARGV[3i]: unix time it expires at.
-- All or nothing: if any counter with a positive amount would pass its limit, nothing changes and the reply is
-- {0, i, current value of counter i, value1, value2, ...} (every counter's current value, for the headers).
-- Otherwise every amount is added and the reply is {1, value1, value2, ...} (the values after adding).
-- A refused request therefore consumes nothing.
-- ARGV after the 3 * #KEYS triples: the numbers of counters that must exist already (day and month token counters,
-- which start from the usage ledger: proxy/accounts/quotaseed.py). If one does not, nothing changes and the reply is
-- {-1, i, ...} (the missing ones): the caller seeds them and runs the script again. This script never creates them.
local missing = {-1}
for j = 3 * #KEYS + 1, #ARGV do
  local i = tonumber(ARGV[j])
  if redis.call('EXISTS', KEYS[i]) == 0 then
    missing[#missing + 1] = i
  end
end
if #missing > 1 then
  return missing
end
local values = {}
local refused = 0
for i = 1, #KEYS do
  local amount = tonumber(ARGV[3 * i - 1])
  values[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  if refused == 0 and amount > 0 and values[i] + amount > tonumber(ARGV[3 * i - 2]) then
    refused = i
  end
end
if refused > 0 then
  local reply = {0, refused, values[refused]}
  for i = 1, #KEYS do
    reply[i + 3] = values[i]
  end
  return reply
end
local reply = {1}
for i = 1, #KEYS do
  local amount = tonumber(ARGV[3 * i - 1])
  if amount ~= 0 then
    values[i] = redis.call('INCRBY', KEYS[i], amount)
    redis.call('EXPIREAT', KEYS[i], ARGV[3 * i])
  end
  reply[i + 1] = values[i]
end
return reply
