-- KEYS: batch, pending, results, events, runnable (index), tally, shards (index).
-- ARGV: batch id, max count, error code, error message, final status, reason, then the
-- result line template (prefix, middle, suffix around the JSON id and custom_id).
-- Stops a batch: a user's cancel (final 'cancelled', status 'cancelling' meanwhile) or
-- promptq's own stop (final 'failed': a fatal upstream answer, the failure rate).
-- Claims refuse a stopped batch at once; up to N never-sent requests get a result with
-- the given code (call again while it returns more); in-flight requests finish. The
-- first stop's final status and reason win. The batch's shards (batch-api route) are
-- due at once: their provider batches are cancelled, their requests end with the code.
-- Returns {status, remaining, became_final}.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'', 0, 0} end
local now = now_s()
if STOPPABLE[status] then
  if redis.call('HSETNX', KEYS[1], 'final_status', ARGV[5]) == 1 then
    -- kept so that requests handed back later (a worker died) end the same way
    redis.call('HSET', KEYS[1], 'reason', ARGV[6], 'stopped_at', now,
               'stop_code', ARGV[3], 'stop_message', ARGV[4])
  end
  if ARGV[5] == S.CANCELLED then
    redis.call('HSET', KEYS[1], 'status', S.CANCELLING, 'cancelling_at', now)
    status = S.CANCELLING
  end
  redis.call('ZREM', KEYS[5], ARGV[1])
  local shards = tonumber(redis.call('HGET', KEYS[1], 'shards') or '0')
  if shards > 0 then
    local t = redis.call('TIME')
    for k = 0, shards - 1 do
      redis.call('ZADD', KEYS[7], 'XX', tonumber(t[1]) * 1000, ARGV[1] .. ':' .. k)
    end
  end
elseif status ~= S.CANCELLING then
  return {status, 0, 0}
end
local ids = redis.call('LPOP', KEYS[2], tonumber(ARGV[2]))
local added = 0
if ids then
  for _, cid in ipairs(ids) do
    if redis.call('HEXISTS', KEYS[3], cid) == 0 then
      -- the line's id comes from its event's id: unique, and no hashing needed
      local event = redis.call('XADD', KEYS[4], '*', 'c', cid)
      local line_id = 'batch_req_stopped_' .. (string.gsub(event, '-', '_'))
      redis.call('HSET', KEYS[3], cid,
                 ARGV[7] .. cjson.encode(line_id) .. ARGV[8] .. cjson.encode(cid) .. ARGV[9])
      added = added + 1
    end
  end
end
local f = redis.call('HINCRBY', KEYS[1], 'failed', added)
if added > 0 then redis.call('HINCRBY', KEYS[6], 'e:' .. ARGV[3], added) end
local remaining = redis.call('LLEN', KEYS[2])
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
local s = tonumber(redis.call('HGET', KEYS[1], 'succeeded') or '0')
if remaining == 0 and s + f >= total then
  redis.call('HSET', KEYS[1], 'finalizing_from', status, 'status', S.FINALIZING,
             'finalizing_at', now)
  return {S.FINALIZING, 0, 1}
end
return {status, remaining, 0}
