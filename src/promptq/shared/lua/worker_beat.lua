-- KEYS: the worker's heartbeat hash, the workers index.
-- ARGV: worker id, heartbeat ttl_ms, then fields (k, v, ...).
-- A heartbeat on Redis' clock: the hash (with last_beat) expires unless renewed, and
-- the index scores the worker by this beat. Returns the beat's time (unix seconds).
local now = now_s()
redis.call('HSET', KEYS[1], 'last_beat', now, unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], now, ARGV[1])
return now
