-- KEYS: the worker's chat list, reply lists...
-- ARGV: reply ttl_s, then per answer: index of its reply list in KEYS (0: none, the
-- request is only forgotten: expired or unreadable), the queue entry, the result line.
-- Answers chat requests: each line goes to its API replica's reply list and the entry
-- leaves the worker's list. Returns how many lines were pushed.
local pushed = 0
local touched = {}
for i = 2, #ARGV, 3 do
  local k = tonumber(ARGV[i])
  redis.call('LREM', KEYS[1], 1, ARGV[i + 1])
  if k > 0 then
    redis.call('RPUSH', KEYS[k], ARGV[i + 2])
    touched[k] = true
    pushed = pushed + 1
  end
end
for k, _ in pairs(touched) do redis.call('EXPIRE', KEYS[k], tonumber(ARGV[1])) end
return pushed
