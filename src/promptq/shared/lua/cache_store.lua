-- KEYS: (cache key, lock key) pairs, one per request.
-- ARGV: worker id, then a (answer JSON or '' for none, ttl s) pair per request.
-- Stores several answers at once, each for its TTL ('' stores nothing: the request
-- failed), and frees each lock this worker still holds (one that expired may be
-- another's now).
for i = 1, #KEYS, 2 do
  local j = i + 1  -- ARGV[j], ARGV[j + 1]: this request's answer and TTL
  if ARGV[j] ~= '' then redis.call('SET', KEYS[i], ARGV[j], 'EX', ARGV[j + 1]) end
  if redis.call('GET', KEYS[i + 1]) == ARGV[1] then redis.call('DEL', KEYS[i + 1]) end
end
return 1
