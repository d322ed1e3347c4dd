-- KEYS: batch, results, inflight, events, requests, tally.
-- ARGV: n, then n groups of 3: custom_id, result JSON, and what the tally counts:
-- "ok|retries|latency_ms|bucket|tokens_in|tokens_out|cost|saved|cached|code" (ok and
-- cached 1|0; latency_ms and its histogram bucket empty for a request never sent; cost
-- and saved in USD, empty for a model with no price; code empty for a success).
-- Records results exactly once per custom_id (HSETNX): a request that ran twice after a
-- crash counts once, in the counters and in the tally alike. A success's request body
-- is dropped (nothing reads it again; a failure's stays for retry-failed). Returns
-- {newly_recorded, became_final 1|0, failure_rate_exceeded 1|0, over_budget 1|0};
-- exactly one caller ever sees became_final = 1. The checks use the batch's
-- `max_failure_rate` / `failure_min_sample` and `max_cost_usd` fields, when set.
local TALLY = '^(%d)|(%d+)|([^|]*)|([^|]*)|(%d+)|(%d+)|([^|]*)|([^|]*)|(%d)|(.*)$'
local n = tonumber(ARGV[1])
local added, ok, failed, retries = 0, 0, 0, 0
local tokens_in, tokens_out, lat_n, lat_sum, lat_max = 0, 0, 0, 0, 0
local cost, saved, unpriced, cached = 0, 0, 0, 0
local buckets, codes = {}, {}
for i = 0, n - 1 do
  local a = 2 + i * 3
  local cid = ARGV[a]
  if redis.call('HSETNX', KEYS[2], cid, ARGV[a + 1]) == 1 then
    added = added + 1
    local is_ok, tries, latency, bucket, t_in, t_out, paid, kept, from_cache, code =
      string.match(ARGV[a + 2], TALLY)
    if is_ok == '1' then
      ok = ok + 1
      redis.call('HDEL', KEYS[5], cid)
    else
      failed = failed + 1
    end
    retries = retries + tonumber(tries)
    if latency ~= '' then
      local ms = tonumber(latency)
      lat_n = lat_n + 1
      lat_sum = lat_sum + ms
      if ms > lat_max then lat_max = ms end
      buckets[bucket] = (buckets[bucket] or 0) + 1
    end
    tokens_in = tokens_in + tonumber(t_in)
    tokens_out = tokens_out + tonumber(t_out)
    if code ~= '' then codes[code] = (codes[code] or 0) + 1 end
    if paid == '' then
      unpriced = unpriced + 1
    else
      cost = cost + tonumber(paid)
      saved = saved + tonumber(kept)
    end
    if from_cache == '1' then cached = cached + 1 end
    redis.call('XADD', KEYS[4], '*', 'c', cid)
  end
  redis.call('HDEL', KEYS[3], cid)
end
if added == 0 then return {0, 0, 0, 0} end
local s = redis.call('HINCRBY', KEYS[1], 'succeeded', ok)
local f = redis.call('HINCRBY', KEYS[1], 'failed', failed)
redis.call('HINCRBY', KEYS[1], 'retries', retries)
if tokens_in > 0 then redis.call('HINCRBY', KEYS[6], 'in', tokens_in) end
if tokens_out > 0 then redis.call('HINCRBY', KEYS[6], 'out', tokens_out) end
if lat_n > 0 then
  redis.call('HINCRBY', KEYS[6], 'lat_n', lat_n)
  redis.call('HINCRBYFLOAT', KEYS[6], 'lat_sum', lat_sum)
  if lat_max > tonumber(redis.call('HGET', KEYS[6], 'lat_max') or '0') then
    redis.call('HSET', KEYS[6], 'lat_max', lat_max)
  end
end
local spent = nil
if cost > 0 then spent = tonumber(redis.call('HINCRBYFLOAT', KEYS[6], 'cost', cost)) end
if saved > 0 then redis.call('HINCRBYFLOAT', KEYS[6], 'saved', saved) end
if unpriced > 0 then redis.call('HINCRBY', KEYS[6], 'unpriced', unpriced) end
if cached > 0 then redis.call('HINCRBY', KEYS[6], 'cached', cached) end
for bucket, count in pairs(buckets) do redis.call('HINCRBY', KEYS[6], 'h:' .. bucket, count) end
for code, count in pairs(codes) do redis.call('HINCRBY', KEYS[6], 'e:' .. code, count) end
local now = now_s()
redis.call('HSET', KEYS[1], 'last_result_at', now)
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local status = redis.call('HGET', KEYS[1], 'status')
if total and s + f >= total and RUNNING[status] then
  redis.call('HSET', KEYS[1], 'finalizing_from', status, 'status', S.FINALIZING,
             'finalizing_at', now)
  return {added, 1, 0, 0}
end
if redis.call('HEXISTS', KEYS[1], 'final_status') == 1 then return {added, 0, 0, 0} end
local budget = tonumber(redis.call('HGET', KEYS[1], 'max_cost_usd') or '')
if budget and spent and spent >= budget then return {added, 0, 0, 1} end
local max_rate = tonumber(redis.call('HGET', KEYS[1], 'max_failure_rate') or '')
if max_rate then
  local sample = tonumber(redis.call('HGET', KEYS[1], 'failure_min_sample') or '20')
  if s + f >= sample and f / (s + f) > max_rate then return {added, 0, 1, 0} end
end
return {added, 0, 0, 0}
