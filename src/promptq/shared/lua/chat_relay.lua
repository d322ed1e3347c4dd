-- KEYS: an API replica's reply list, then the cancel key of each stream with events in
-- this write (or, with no payload, of each stream to ask about).
-- ARGV: reply ttl_s, payload (stream events as JSON lines, joined by newlines; '').
-- Relays streamed answers' events from one worker to one replica in one element, and
-- says which of those streams' clients have gone: their cancel keys are dropped (they
-- were only the message) and their positions (1-based, in KEYS[2..]) returned. Events
-- of a stream whose client has gone are ignored by the replica.
local gone = {}
for k = 2, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 then
    redis.call('DEL', KEYS[k])
    gone[#gone + 1] = k - 1
  end
end
if ARGV[2] ~= '' then
  redis.call('RPUSH', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
end
return gone
