-- KEYS: batch, order, batches (index), runnable (index), active (set), pending.
-- ARGV: batch id, total, written.
-- Flips a batch from 'validating' to 'queued' and lists it, once its first requests are
-- written: workers start on them while the producer writes the rest ('loading' until
-- every request is in). Only if all the producer says it wrote made it into Redis: a
-- producer that dies before this leaves 'validating', which nothing runs.
-- Returns {1, 'queued'}, or {0, status} / {0, 'incomplete:<n>'} when nothing changed.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= S.VALIDATING then return {0, status or ''} end
local n = redis.call('LLEN', KEYS[2])
if n ~= tonumber(ARGV[3]) then return {0, 'incomplete:' .. n} end
redis.call('HSET', KEYS[1], 'status', S.QUEUED, 'total', ARGV[2])
if n < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], 'loading', 1) end
redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
if redis.call('LLEN', KEYS[6]) > 0 then
  redis.call('ZADD', KEYS[4], service_score(KEYS[1]), ARGV[1])
end
redis.call('SADD', KEYS[5], ARGV[1])
return {1, S.QUEUED}
