-- KEYS: the sweep index.  ARGV: max count.
-- Batches whose TTL is up (on Redis' clock), at most N: their keys are to be UNLINKed.
local t = redis.call('TIME')
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tonumber(t[1]), 'LIMIT', 0,
                  tonumber(ARGV[1]))
