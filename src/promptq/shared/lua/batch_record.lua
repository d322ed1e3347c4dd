-- KEYS: batch, results, inflight, events.
-- ARGV: n, then n groups of (custom_id, result_json, ok 1|0, retries).
-- Records results exactly once per custom_id (HSETNX): a request that ran twice after a
-- crash counts once. Returns {newly_recorded, became_final 1|0, failure_rate_exceeded
-- 1|0}; exactly one caller ever sees became_final = 1 (the batch is then finalizing).
-- The failure-rate check uses the batch's max_failure_rate / failure_min_sample fields.
local n = tonumber(ARGV[1])
local added, ok, failed, retries = 0, 0, 0, 0
for i = 0, n - 1 do
  local cid = ARGV[2 + i * 4]
  if redis.call('HSETNX', KEYS[2], cid, ARGV[3 + i * 4]) == 1 then
    added = added + 1
    if ARGV[4 + i * 4] == '1' then ok = ok + 1 else failed = failed + 1 end
    retries = retries + tonumber(ARGV[5 + i * 4])
    redis.call('XADD', KEYS[4], '*', 'c', cid)
  end
  redis.call('HDEL', KEYS[3], cid)
end
if added == 0 then return {0, 0, 0} end
local s = redis.call('HINCRBY', KEYS[1], 'succeeded', ok)
local f = redis.call('HINCRBY', KEYS[1], 'failed', failed)
redis.call('HINCRBY', KEYS[1], 'retries', retries)
local now = now_s()
redis.call('HSET', KEYS[1], 'last_result_at', now)
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local status = redis.call('HGET', KEYS[1], 'status')
if total and s + f >= total and RUNNING[status] then
  redis.call('HSET', KEYS[1], 'finalizing_from', status, 'status', S.FINALIZING,
             'finalizing_at', now)
  return {added, 1, 0}
end
local max_rate = tonumber(redis.call('HGET', KEYS[1], 'max_failure_rate') or '')
if max_rate and redis.call('HEXISTS', KEYS[1], 'final_status') == 0 then
  local sample = tonumber(redis.call('HGET', KEYS[1], 'failure_min_sample') or '20')
  if s + f >= sample and f / (s + f) > max_rate then return {added, 0, 1} end
end
return {added, 0, 0}
