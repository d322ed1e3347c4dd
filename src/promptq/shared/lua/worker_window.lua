-- KEYS: the workers index.  ARGV: liveness window_s, 'live' or 'stale'.
-- Worker ids whose last beat is within the window of Redis' clock ('live') or older
-- ('stale'), measured on Redis' clock so that no machine's clock matters.
local now = tonumber(now_s())
if ARGV[2] == 'live' then
  return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[1])))
