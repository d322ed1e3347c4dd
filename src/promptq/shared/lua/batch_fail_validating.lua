-- KEYS: batch, requests, pending, batches (index), order.
-- ARGV: batch id, ttl_s, reason, errors JSON.
-- Ends a batch that is still 'validating' as 'failed' (OpenAI's answer to an invalid
-- input file): drops whatever requests were written, keeps the errors, lists the batch.
-- A batch that moved on meanwhile (cancelled, queued) is left alone; returns its status.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= S.VALIDATING then return status or '' end
local now = now_s()
redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[5])
redis.call('HSET', KEYS[1], 'status', S.FAILED, 'failed_at', now, 'total', 0,
           'reason', ARGV[3], 'errors', ARGV[4])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
redis.call('ZADD', KEYS[4], redis.call('HGET', KEYS[1], 'created_at') or now, ARGV[1])
return S.FAILED
