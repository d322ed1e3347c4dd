-- KEYS: the webhook deliveries index (batch id -> when its next attempt is due, ms).
-- ARGV: at most this many, lease_ms.
-- Takes the deliveries that are due, each for one worker: its score moves lease_ms
-- ahead, so a worker that dies while delivering leaves it due again after the lease.
-- Returns the batch ids.
local now = math.floor(tonumber(now_s()) * 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id) end
return due
