-- One deployment's shared health (proxy/stores/fleethealth.py): one event booked and announced in one round trip.
-- KEYS[1]: the deployment's hash. ARGV: op (fail|ok|pause|probe|probed|silent|heard|read), allowed_fails, cooldown_s,
-- solo (0|1), pause_s (pause), probe hold_s (probe), the probe's outcome (probed: 1 answered, 0 failed, -1 no
-- outcome), whether the failed call was answered (fail: 1, an error status or a refused connection; 0, a timeout)
-- or the silent call's hold_s (silent),
-- the channel, the announcement's head (JSON text up to its state), the instance booking it (kept as `by`, with
-- the op and its time `at`: who saw what, for /admin/upstreams).
-- `cool` stays set once a cooldown ends until a call answers (ok, or a probe answered): its next call is a trial,
-- claimed as a pause's probe is (probe). `quiet` (when it was found silent: a call in flight unanswered too long) stays
-- set until any answer (ok, heard, pause, an answered fail, a probe answered) or a cooldown; meanwhile its calls go
-- elsewhere and its next call is a trial, claimed the same way; the silent call holds the claim for hold_s, until
-- the silence ends.
-- Times are Redis's own clock (TIME), so instances with skewed clocks agree. Reply: {changed, granted, state}, the
-- state `now fails cool_until paused_until probe_at probe_until quiet` as text; a change is PUBLISHed as
-- head..state}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local h = redis.call('HMGET', KEYS[1], 'fails', 'cool', 'paused', 'probe_at', 'probe_until', 'quiet')
local fails, cool = tonumber(h[1]) or 0, tonumber(h[2]) or 0
local paused, probe_at, probe_until = tonumber(h[3]) or 0, tonumber(h[4]) or 0, tonumber(h[5]) or 0
local quiet = tonumber(h[6]) or 0
if not (quiet > 0) then quiet = 0 elseif quiet > now then quiet = now end  -- junk (negative, nan, inf): a time
local was_quiet = quiet > 0
local op, allowed, cooldown, solo = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local arg = tonumber(ARGV[5])
local changed, granted = 1, 0
if op == 'read' then
  if h[1] == false then return {0, 0, ''} end  -- never booked: nothing to say
  changed = 0
elseif op == 'fail' then
  if cool > now then
    changed = 0  -- a call sent before the cooldown began: the cooldown stands as it is
  else
    fails = fails + 1
    if arg == 1 then quiet = 0 end  -- it answered (with an error): not silent
    if not solo and fails >= allowed then
      cool = now + cooldown
      fails = allowed - 1  -- after the cooldown, its first call decides
      quiet = 0  -- the cooldown's trial takes the silence's place
    end
  end
elseif op == 'ok' then
  if cool > now then
    if fails == 0 and quiet == 0 then changed = 0 else fails, quiet = 0, 0 end  -- it ends no cooldown
  elseif fails == 0 and cool == 0 and quiet == 0 then
    changed = 0
  else
    fails, cool, quiet = 0, 0, 0  -- answered after its cooldown: back, no trial due
  end
elseif op == 'heard' then
  if quiet == 0 then changed = 0 else quiet = 0 end  -- an answer about the call's input: not silent
elseif op == 'silent' then
  if solo or cool > 0 or (quiet > 0 and probe_until >= now + arg) then
    changed = 0  -- a cooldown or its trial governs; or already known
  else
    if quiet == 0 then quiet = now end
    probe_until = math.max(probe_until, now + arg)
  end
elseif op == 'pause' then
  paused = math.max(paused, now + arg)
  probe_at = now + cooldown
  quiet = 0
elseif op == 'probe' then
  -- a pause's probe, or the trial after a cooldown (cool > 0 until a call answers): one call at a time
  if probe_until <= now and cool <= now and (now < paused or cool > 0 or quiet > 0) and now >= probe_at then
    probe_until, granted = now + arg, 1
  else
    changed = 0
  end
elseif op == 'probed' then
  probe_until = 0
  if arg == 1 then
    paused, probe_at, quiet = 0, 0, 0
    if cool <= now then fails, cool = 0, 0 end
  elseif arg == 0 then
    probe_at = math.max(probe_at, now + cooldown)
  end
end
if was_quiet and quiet == 0 and cool <= now then
  probe_until = 0  -- the silence ended (an answer, a pause): so did the silent call's hold on its trial
end
local state = string.format('%.6f %d %.6f %.6f %.6f %.6f %.6f', now, fails, cool, paused, probe_at, probe_until,
                            quiet)
if changed == 1 then
  redis.call('HSET', KEYS[1], 'fails', fails, 'cool', string.format('%.6f', cool),
             'paused', string.format('%.6f', paused), 'probe_at', string.format('%.6f', probe_at),
             'probe_until', string.format('%.6f', probe_until), 'quiet', string.format('%.6f', quiet),
             'by', ARGV[8] or '', 'op', op,
             'at', string.format('%.6f', now))
  redis.call('EXPIRE', KEYS[1], 86400)
  redis.call('PUBLISH', ARGV[6], ARGV[7] .. '"' .. state .. '"}')
end
return {changed, granted, state}
