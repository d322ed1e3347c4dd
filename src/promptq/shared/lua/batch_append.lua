-- KEYS: batch, requests, pending, order, runnable (index).
-- ARGV: batch id, pending 1|0, then (custom_id, request JSON) pairs.
-- Writes requests of a batch in input order: stored, in the input order list, pending
-- (unless their route sends them another way: the batch-api route's shards), counted in
-- 'written' ('loading' goes once every request is in). A batch that takes claims is
-- listed as runnable (its place kept if listed). Returns {written, stopped}: requests
-- written to a stopped batch must be stopped too (the caller stops it again).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {-1, 0} end
local fields, ids = {}, {}
for i = 3, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
  ids[#ids + 1] = ARGV[i]
end
redis.call('HSET', KEYS[2], unpack(fields))
if ARGV[2] == '1' then redis.call('RPUSH', KEYS[3], unpack(ids)) end
redis.call('RPUSH', KEYS[4], unpack(ids))
local written = redis.call('HINCRBY', KEYS[1], 'written', #ids)
if written >= tonumber(redis.call('HGET', KEYS[1], 'total') or '0') then
  redis.call('HDEL', KEYS[1], 'loading')
end
local stopped = redis.call('HEXISTS', KEYS[1], 'final_status')
if stopped == 0 and CLAIMABLE[status] and ARGV[2] == '1' then
  redis.call('ZADD', KEYS[5], 'NX', service_score(KEYS[1]), ARGV[1])
end
return {written, stopped}
