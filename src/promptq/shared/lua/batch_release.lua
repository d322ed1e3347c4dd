-- KEYS: batch, pending, inflight, results, runnable (index).
-- ARGV: batch id, 'ids' then custom_ids, or 'owner' then a worker id.
-- Hands claimed but unfinished requests back to the front of pending (a worker shutting
-- down, a dead worker, a claim whose reply was lost): those of the given ids, or every
-- request that the given worker holds, unless a result exists. A request handed back
-- to a batch that takes claims lists the batch as runnable again.
-- Returns {handed back, stopped 1|0}: a stopped batch's caller must stop it again so
-- that the requests handed back end with the stop's code.
local ids = {}
if ARGV[2] == 'owner' then
  local entries = redis.call('HGETALL', KEYS[3])
  for i = 1, #entries, 2 do
    if entries[i + 1] == ARGV[3] then ids[#ids + 1] = entries[i] end
  end
else
  for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local n = 0
for i = #ids, 1, -1 do
  if redis.call('HDEL', KEYS[3], ids[i]) == 1 and redis.call('HEXISTS', KEYS[4], ids[i]) == 0 then
    redis.call('LPUSH', KEYS[2], ids[i])
    n = n + 1
  end
end
local stopped = redis.call('HEXISTS', KEYS[1], 'final_status')
if n > 0 and stopped == 0 and CLAIMABLE[redis.call('HGET', KEYS[1], 'status')] then
  redis.call('ZADD', KEYS[5], service_score(KEYS[1]), ARGV[1])
end
return {n, stopped}
