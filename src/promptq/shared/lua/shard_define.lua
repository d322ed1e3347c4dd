-- KEYS: batch, shards (hash), shards index.  ARGV: batch id, start, end, bytes.
-- Defines the batch's next shard of the batch-api route: input order lines [start, end),
-- due at once. Shards are cut in input order while the producer writes the batch; a
-- resumed producer cuts again from where the last one ended ('sharded'), so a shard
-- given again is left as it is. Returns {sharded, shards}: where the defined shards end
-- and how many there are.
local sharded = tonumber(redis.call('HGET', KEYS[1], 'sharded') or '0')
local count = tonumber(redis.call('HGET', KEYS[1], 'shards') or '0')
if not redis.call('HGET', KEYS[1], 'status') then return {-1, 0} end
if tonumber(ARGV[2]) ~= sharded then return {sharded, count} end
local k = tostring(count)
redis.call('HSET', KEYS[2], k .. ':start', ARGV[2], k .. ':end', ARGV[3],
           k .. ':bytes', ARGV[4], k .. ':state', 'new')
redis.call('HSET', KEYS[1], 'sharded', ARGV[3], 'shards', count + 1)
local t = redis.call('TIME')
redis.call('ZADD', KEYS[3], tonumber(t[1]) * 1000, ARGV[1] .. ':' .. k)
return {tonumber(ARGV[3]), count + 1}
