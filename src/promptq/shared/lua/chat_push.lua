-- KEYS: chat queue, push marker, the previous push's marker.  ARGV: marker ttl_s, entries...
-- Queues chat requests once: the marker (one per push, named by a token) makes a push
-- that redis-py sent again after a lost reply a no-op. The previous push's marker is
-- done with (its reply came back) and goes. Returns how many were queued.
redis.call('DEL', KEYS[3])
if not redis.call('SET', KEYS[2], 1, 'NX', 'EX', tonumber(ARGV[1])) then return 0 end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
return #ARGV - 1
