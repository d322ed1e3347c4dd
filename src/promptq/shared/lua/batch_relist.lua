-- KEYS: batch, pending, runnable (index).  ARGV: batch id.
-- Lists a batch that takes claims and has pending requests in the runnable index (a
-- resumed batch, in case the index lost it). Returns 1 when it is listed.
if not CLAIMABLE[redis.call('HGET', KEYS[1], 'status')] then return 0 end
if redis.call('HEXISTS', KEYS[1], 'final_status') == 1 then return 0 end
if redis.call('LLEN', KEYS[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[3], 'NX', service_score(KEYS[1]), ARGV[1])
return 1
