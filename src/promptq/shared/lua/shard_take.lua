-- KEYS: shards index, shards (hash of the member's batch).
-- ARGV: member ("<batch id>:<k>"), k, lease ms, lease token.
-- Takes a shard whose next step is due, leased to the caller: its score moves a lease
-- ahead (no other worker takes it meanwhile; one that dies lets it run out) and the
-- token goes in the shard's 'lease' (updates check it, so a worker that lost its lease
-- changes nothing). Returns 1 when taken, 0 when gone or not due (another took it).
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(score) > now then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2] .. ':lease', ARGV[4])
return 1
