-- KEYS: batch, order, results, pending, events, runnable (index), tally, shards (hash).
-- ARGV: batch id, k, mode ('fallback' | 'fail'), max count, error code, then the result
-- line template (prefix, middle, suffix, as the stop script's).
-- Settles up to N requests of shard k, from its cursor: each without a result goes to
-- the realtime lane ('fallback': pending, the batch listed as runnable) or ends with the
-- given error ('fail'). The cursor moves in the same script, so a worker that dies
-- midway pushes nothing twice. Nothing goes to a stopped batch's realtime lane: then
-- it returns at once with stopped = 1 (settle with 'fail' and the stop's code instead).
-- Returns {done 1|0, pushed, became_final 1|0, stopped 1|0}.
local k = ARGV[2]
if ARGV[3] == 'fallback' and redis.call('HEXISTS', KEYS[1], 'final_status') == 1 then
  return {0, 0, 0, 1}
end
local shard = redis.call('HMGET', KEYS[8], k .. ':cursor', k .. ':start', k .. ':end')
local cursor = tonumber(shard[1] or shard[2])
local stop = tonumber(shard[3])
local last = math.min(cursor + tonumber(ARGV[4]), stop) - 1
local pushed, added = 0, 0
if last >= cursor then
  local ids = redis.call('LRANGE', KEYS[2], cursor, last)
  for _, cid in ipairs(ids) do
    if redis.call('HEXISTS', KEYS[3], cid) == 0 then
      if ARGV[3] == 'fallback' then
        redis.call('RPUSH', KEYS[4], cid)
        pushed = pushed + 1
      else
        local event = redis.call('XADD', KEYS[5], '*', 'c', cid)
        local line_id = 'batch_req_stopped_' .. (string.gsub(event, '-', '_'))
        redis.call('HSET', KEYS[3], cid,
                   ARGV[6] .. cjson.encode(line_id) .. ARGV[7] .. cjson.encode(cid) .. ARGV[8])
        added = added + 1
      end
    end
  end
end
redis.call('HSET', KEYS[8], k .. ':cursor', last + 1)
if pushed > 0 and redis.call('HEXISTS', KEYS[1], 'final_status') == 0 then
  redis.call('ZADD', KEYS[6], 'NX', service_score(KEYS[1]), ARGV[1])
end
local became_final = 0
if added > 0 then
  redis.call('HINCRBY', KEYS[7], 'e:' .. ARGV[5], added)
  local f = redis.call('HINCRBY', KEYS[1], 'failed', added)
  local s = tonumber(redis.call('HGET', KEYS[1], 'succeeded') or '0')
  local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
  local status = redis.call('HGET', KEYS[1], 'status')
  local now = now_s()
  redis.call('HSET', KEYS[1], 'last_result_at', now)
  if s + f >= total and RUNNING[status] then
    redis.call('HSET', KEYS[1], 'finalizing_from', status, 'status', S.FINALIZING,
               'finalizing_at', now)
    became_final = 1
  end
end
local done = 0
if last + 1 >= stop then done = 1 end
return {done, pushed, became_final, 0}
