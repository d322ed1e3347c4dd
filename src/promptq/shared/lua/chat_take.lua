-- KEYS: chat queue, the worker's chat list.  ARGV: max count.
-- A worker takes up to N more chat requests without blocking (after BLMOVE gave it
-- one): each moves from the queue into the worker's own list, where it stays until it
-- is answered, so Redis hands every request to exactly one worker. Returns the entries.
local out = {}
for _ = 1, tonumber(ARGV[1]) do
  local e = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not e then break end
  out[#out + 1] = e
end
return out
