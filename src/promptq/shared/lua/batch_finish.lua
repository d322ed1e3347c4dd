-- KEYS: batch, stats, events, claims, then every other key of the batch (they get the TTL).
-- ARGV: ttl_s, then stats fields (k, v, ...).
-- Written by the aggregator: stats first, then the terminal status, then an 'end' event
-- for followers, and a TTL on every key of the batch. Does nothing unless finalizing,
-- so running it twice is harmless. Returns the status afterwards.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= S.FINALIZING then return status or '' end
local final = redis.call('HGET', KEYS[1], 'final_status') or S.COMPLETED
if #ARGV > 1 then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], unpack(ARGV, 2))
end
local now = now_s()
redis.call('HSET', KEYS[1], 'status', final, 'completed_at', now, final .. '_at', now)
redis.call('XADD', KEYS[3], '*', 'end', final)
redis.call('DEL', KEYS[4])  -- no claim is sent again now
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[1])) end
return final
