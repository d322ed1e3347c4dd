-- KEYS: the worker's chat list, then one reply list per API replica answered.
-- ARGV: reply ttl_s, n, then n queue entries (each leaves the worker's list), then one
-- payload per reply list: that replica's result lines, joined by newlines.
-- Answers chat requests: each replica gets one element with all of its answers of this
-- flush (so its listener takes them in one BLMOVE), and the entries are forgotten (an
-- entry with no answer: its request expired or was unreadable). Returns 1.
local n = tonumber(ARGV[2])
for i = 3, 2 + n do redis.call('LREM', KEYS[1], 1, ARGV[i]) end
for k = 2, #KEYS do
  redis.call('RPUSH', KEYS[k], ARGV[1 + n + k])
  redis.call('EXPIRE', KEYS[k], tonumber(ARGV[1]))
end
return 1
