-- KEYS: an API replica's reply list, its delivery list.  ARGV: max count.
-- The replica takes answers in two steps, so none is lost if its connection drops:
-- answers move into the delivery list (up to N more), the whole delivery list comes
-- back (answers moved before a dropped reply included), and once handed to their
-- waiting handlers the replica deletes the delivery list (its ack).
for _ = 1, tonumber(ARGV[1]) do
  if not redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') then break end
end
return redis.call('LRANGE', KEYS[2], 0, -1)
