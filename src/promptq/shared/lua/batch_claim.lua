-- KEYS: batch, pending, inflight, requests, claims, runnable (index).
-- ARGV: max count, worker id, batch id, claim token, the worker's previous claim token.
-- A worker claims up to N requests: popped from pending, marked in flight with its id.
-- Idempotent: the claims hash remembers what a token took, so a claim that Redis ran but
-- whose reply was lost returns the same requests when sent again (redis-py retries it);
-- the worker's previous claim is done with (its reply came back) and is forgotten.
-- The batch moves to the back of its lane in the runnable index (round robin between
-- batches), or leaves it when nothing is pending.
-- Returns {-1} for a batch that takes no claims (stopped, finished, gone), else
-- {remaining, priority, endpoint, cache_ttl_s, request_json...}.
local status = redis.call('HGET', KEYS[1], 'status')
if not CLAIMABLE[status] or redis.call('HEXISTS', KEYS[1], 'final_status') == 1 then
  redis.call('ZREM', KEYS[6], ARGV[3])
  return {-1}
end
local ids
local prior = redis.call('HGET', KEYS[5], ARGV[4])
if prior then
  ids = cjson.decode(prior)
else
  if ARGV[5] ~= '' then redis.call('HDEL', KEYS[5], ARGV[5]) end
  ids = redis.call('LPOP', KEYS[2], tonumber(ARGV[1])) or {}
  if #ids > 0 then
    redis.call('HSET', KEYS[5], ARGV[4], cjson.encode(ids))
    for _, id in ipairs(ids) do redis.call('HSET', KEYS[3], id, ARGV[2]) end
  end
end
local remaining = redis.call('LLEN', KEYS[2])
if remaining == 0 then
  redis.call('ZREM', KEYS[6], ARGV[3])
else
  redis.call('ZADD', KEYS[6], service_score(KEYS[1]), ARGV[3])
end
local meta = redis.call('HMGET', KEYS[1], 'priority', 'endpoint', 'cache_ttl_s')
local out = {remaining, meta[1] or '', meta[2] or '', meta[3] or ''}
if #ids == 0 then return out end
if status == S.QUEUED then
  redis.call('HSET', KEYS[1], 'status', S.IN_PROGRESS, 'in_progress_at', now_s())
end
local bodies = redis.call('HMGET', KEYS[4], unpack(ids))
for i = 1, #ids do out[#out + 1] = bodies[i] end
return out
