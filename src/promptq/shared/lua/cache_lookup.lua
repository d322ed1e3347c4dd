-- KEYS: (cache key, lock key) pairs, one per request.  ARGV: worker id, lock ms.
-- Looks up several requests' answers at once. For each: the cached answer (a JSON
-- body), or '' when this worker now holds its lock (it sends the request and stores the
-- answer), or '-' when another worker holds it (wait, and look again).
local out = {}
for i = 1, #KEYS, 2 do
  local found = redis.call('GET', KEYS[i])
  if found then
    out[#out + 1] = found
  elseif redis.call('SET', KEYS[i + 1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[#out + 1] = ''
  else
    out[#out + 1] = '-'
  end
end
return out
