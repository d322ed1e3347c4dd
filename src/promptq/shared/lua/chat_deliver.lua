-- KEYS: an API replica's reply list, its delivery list.  ARGV: max count.
-- Moves up to N answers from the reply list into the delivery list and returns them
-- (the replica hands them to their waiting handlers). The delivery list keeps them
-- until the replica deletes it, so an answer moved before a dropped connection is read
-- again (``LRANGE``), never lost; handing an answer out twice is harmless.
local out = {}
for _ = 1, tonumber(ARGV[1]) do
  local line = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not line then break end
  out[#out + 1] = line
end
return out
