-- Renews or releases a lock taken with SET NX PX, only while its holder's token is in it: a holder whose lock
-- expired and was taken by another never renews or deletes the other's (proxy/accounts/keyindexbuild.py).
-- KEYS[1]: the lock. ARGV[1]: the holder's token; ARGV[2]: the new time to live in ms, or 0 to release.
-- Reply: 1 if the token was there (renewed or released), 0 if not.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
