-- KEYS: shards (hash), shards index, batch.
-- ARGV: member, k, lease token, next step in ms (-1: the shard is done), start 1|0, then
-- the shard's fields to set (name, value, ...).
-- A leased shard's step: its fields, and when its next step is due (a lease renewal
-- when no field is given). 'start' marks the batch in_progress (its first provider batch
-- runs). Refused (returns 0) when the lease is no longer the caller's: another worker
-- took the shard over; else 1.
local k = ARGV[2]
if redis.call('HGET', KEYS[1], k .. ':lease') ~= ARGV[3] then return 0 end
if #ARGV > 5 then
  local fields = {}
  for i = 6, #ARGV, 2 do
    fields[#fields + 1] = k .. ':' .. ARGV[i]
    fields[#fields + 1] = ARGV[i + 1]
  end
  redis.call('HSET', KEYS[1], unpack(fields))
end
if ARGV[5] == '1' and redis.call('HGET', KEYS[3], 'status') == S.QUEUED then
  redis.call('HSET', KEYS[3], 'status', S.IN_PROGRESS, 'in_progress_at', now_s())
end
local delay = tonumber(ARGV[4])
if delay < 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[1], k .. ':lease')
else
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[2], 'XX', now + delay, ARGV[1])
end
return 1
