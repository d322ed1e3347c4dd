-- KEYS: batch, requests, pending, order.  ARGV: fields of the new batch (k, v, ...).
-- Creates the batch hash in status 'validating' unless the id is taken. A batch still
-- 'validating' was left by a producer that died while writing it: start it over.
-- A 'deadline_s' field (route batch-api) gives 'deadline_at' on Redis' clock.
-- Returns the existing status, or '' when created.
local existing = redis.call('HGET', KEYS[1], 'status')
if existing then
  if existing ~= S.VALIDATING then return existing end
  redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
end
redis.call('HSET', KEYS[1], 'status', S.VALIDATING, 'created_at', now_s(),
           'succeeded', 0, 'failed', 0, 'retries', 0, 'written', 0, unpack(ARGV))
local deadline = redis.call('HGET', KEYS[1], 'deadline_s')
if deadline then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'deadline_at',
             string.format('%.3f', tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(deadline)))
end
return ''
