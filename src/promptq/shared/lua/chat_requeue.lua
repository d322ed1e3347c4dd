-- KEYS: chat queue, a worker's chat list.  ARGV: 'all', or 'entries' then entries.
-- Hands unanswered chat requests back to the front of the queue, oldest first (a worker
-- shutting down, a dead worker, a take whose reply was lost). Returns how many.
local entries = {}
if ARGV[1] == 'all' then
  entries = redis.call('LRANGE', KEYS[2], 0, -1)
else
  for i = 2, #ARGV do entries[#entries + 1] = ARGV[i] end
end
local n = 0
for i = #entries, 1, -1 do
  if redis.call('LREM', KEYS[2], 1, entries[i]) == 1 then
    redis.call('LPUSH', KEYS[1], entries[i])
    n = n + 1
  end
end
return n
