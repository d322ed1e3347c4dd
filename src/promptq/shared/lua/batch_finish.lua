-- KEYS: batch, stats, events, claims, tally, sweep (index), then the batch's big keys
-- (events, requests, pending, order, inflight, results, shards), then the webhook
-- deliveries index and the batch's webhook hash.
-- ARGV: ttl_s, batch id, backstop_s, the default webhook url ('' for none), then stats
-- fields (k, v, ...).
-- Written by the aggregator: stats first, then the terminal status, then an 'end' event
-- for followers. The small keys get the TTL; the big ones are listed in the sweep index
-- to be UNLINKed (freed off Redis' main thread) when the TTL is up, with an EXPIRE that
-- much later only as a backstop should no worker run then. Does nothing unless
-- finalizing, so running it twice is harmless. With a webhook URL (the batch's own, or
-- the default) the batch's event is enqueued in the same step: never lost, never twice.
-- Returns the status afterwards.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= S.FINALIZING then return status or '' end
local final = redis.call('HGET', KEYS[1], 'final_status') or S.COMPLETED
if #ARGV > 4 then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], unpack(ARGV, 5))
end
local now = now_s()
redis.call('HSET', KEYS[1], 'status', final, 'completed_at', now, final .. '_at', now)
redis.call('XADD', KEYS[3], '*', 'end', final)
redis.call('DEL', KEYS[4])  -- no claim is sent again now
local ttl = tonumber(ARGV[1])
for _, i in ipairs({1, 2, 5}) do redis.call('EXPIRE', KEYS[i], ttl) end
for i = 7, 13 do redis.call('EXPIRE', KEYS[i], ttl + tonumber(ARGV[3])) end
redis.call('ZADD', KEYS[6], tonumber(now) + ttl, ARGV[2])
local url = redis.call('HGET', KEYS[1], 'webhook_url') or ARGV[4]
if url ~= '' then
  redis.call('HSET', KEYS[15], 'url', url, 'type', final, 'created_at', now, 'attempts', 0,
    'status', 'pending')
  redis.call('EXPIRE', KEYS[15], ttl)
  redis.call('ZADD', KEYS[14], math.floor(tonumber(now) * 1000), ARGV[2])
end
return final
