-- KEYS: chat queue, the API replica's push counter.  ARGV: counter ttl_s, push number,
-- entries...
-- Queues chat requests once: each push of a replica carries the next number, and a
-- push whose number is not above the last one seen (redis-py sent it again after a lost
-- reply) queues nothing. Returns how many were queued.
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if last >= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', tonumber(ARGV[1]))
redis.call('RPUSH', KEYS[1], unpack(ARGV, 3))
return #ARGV - 2
