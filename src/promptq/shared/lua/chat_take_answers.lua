-- KEYS: an API replica's reply list, its delivery list. ARGV: at most this many.
-- Moves waiting answer elements (final answers, streamed events) into the delivery list
-- and returns them: a busy replica takes everything waiting in one round trip.
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local element = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not element then break end
  out[#out + 1] = element
end
return out
