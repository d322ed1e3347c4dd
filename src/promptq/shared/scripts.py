"""Lua scripts: every multi-step change of a batch's state is one atomic script.

Each script touches the keys of one batch only (all share the ``{ID}`` hash tag) or
the chat lane's keys only (all share ``{chat}``), so they run unchanged on Redis
Cluster. Timestamps come from Redis' own clock (``TIME``),
one clock for producers and workers on every machine.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

# Shared Lua prelude: unix seconds with ms resolution, as a decimal string.
_NOW = """
local _t = redis.call('TIME')
local now = string.format('%.3f', tonumber(_t[1]) + math.floor(tonumber(_t[2]) / 1000) / 1000)
"""

# KEYS: batch, requests, pending. ARGV: created fields (k, v, ...).
# Creates the batch hash in status 'validating' unless the id is taken. Returns the
# existing status, or '' when created.
CREATE = (
    _NOW
    + """
local existing = redis.call('HGET', KEYS[1], 'status')
if existing then
  if existing ~= 'validating' then return existing end
  -- a producer died while enqueueing this id: start over
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
end
redis.call('HSET', KEYS[1], 'status', 'validating', 'created_at', now,
           'succeeded', 0, 'failed', 0, 'retries', 0, unpack(ARGV))
return ''
"""
)

# KEYS: batch, pending, batches-zset. ARGV: batch_id, expected total.
# Flips a fully written batch from 'validating' to 'queued' (and lists it) only if
# every request made it into Redis: a producer that dies midway leaves 'validating'.
PUBLISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'validating' then return {0, status or ''} end
local n = redis.call('LLEN', KEYS[2])
if n ~= tonumber(ARGV[2]) then return {0, 'incomplete:' .. n} end
redis.call('HSET', KEYS[1], 'status', 'queued', 'total', ARGV[2])
redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
return {1, 'queued'}
"""

# KEYS: batch, pending, inflight, requests. ARGV: max count, worker id.
# Claims up to N requests for a worker: pops ids from pending, marks them in flight and
# returns {remaining_pending, request_json...}. Nothing is claimed unless the batch is
# queued or in progress (a cancelled batch stops dispatch at once).
CLAIM = (
    _NOW
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'in_progress' then return {-1} end
if redis.call('HEXISTS', KEYS[1], 'final_status') == 1 then return {-1} end
local ids = redis.call('LPOP', KEYS[2], tonumber(ARGV[1]))
if not ids then return {0} end
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', now)
end
local out = {redis.call('LLEN', KEYS[2])}
local bodies = redis.call('HMGET', KEYS[4], unpack(ids))
for i, id in ipairs(ids) do
  redis.call('HSET', KEYS[3], id, ARGV[2])
  out[#out + 1] = bodies[i]
end
return out
"""
)

# KEYS: batch, results, inflight, events.
# ARGV: n, then n groups of (custom_id, result_json, ok 1|0, retries).
# Records results exactly once per custom_id (HSETNX): a request that ran twice after
# a crash counts once. Returns {newly_recorded, became_final 1|0, failure_rate_exceeded
# 1|0}; exactly one caller ever sees became_final = 1, and that caller enqueues the
# aggregator job. The failure-rate check uses the batch's `max_failure_rate` and
# `failure_min_sample` fields, when set.
RECORD = (
    _NOW
    + """
local n = tonumber(ARGV[1])
local added, ok, failed, retries = 0, 0, 0, 0
for i = 0, n - 1 do
  local cid = ARGV[2 + i * 4]
  if redis.call('HSETNX', KEYS[2], cid, ARGV[3 + i * 4]) == 1 then
    added = added + 1
    if ARGV[4 + i * 4] == '1' then ok = ok + 1 else failed = failed + 1 end
    retries = retries + tonumber(ARGV[5 + i * 4])
    redis.call('XADD', KEYS[4], '*', 'c', cid)
  end
  redis.call('HDEL', KEYS[3], cid)
end
if added == 0 then return {0, 0, 0} end
local s = redis.call('HINCRBY', KEYS[1], 'succeeded', ok)
local f = redis.call('HINCRBY', KEYS[1], 'failed', failed)
redis.call('HINCRBY', KEYS[1], 'retries', retries)
redis.call('HSET', KEYS[1], 'last_result_at', now)
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local status = redis.call('HGET', KEYS[1], 'status')
if total and s + f >= total and (status == 'in_progress' or status == 'queued'
    or status == 'cancelling') then
  redis.call('HSET', KEYS[1], 'finalizing_from', status, 'status', 'finalizing',
             'finalizing_at', now)
  return {added, 1, 0}
end
local max_rate = tonumber(redis.call('HGET', KEYS[1], 'max_failure_rate') or '')
if max_rate and redis.call('HEXISTS', KEYS[1], 'final_status') == 0 then
  local sample = tonumber(redis.call('HGET', KEYS[1], 'failure_min_sample') or '20')
  if s + f >= sample and f / (s + f) > max_rate then return {added, 0, 1} end
end
return {added, 0, 0}
"""
)

# KEYS: batch, stats, events, + every other key of the batch (for EXPIRE).
# ARGV: ttl_s, then stats fields (k, v, ...).
# Written by the aggregator job: stats first, then the terminal status, then an 'end'
# event for followers, and a TTL on every key of the batch.
FINISH = (
    _NOW
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'finalizing' then return status or '' end
local final = redis.call('HGET', KEYS[1], 'final_status') or 'completed'

if #ARGV > 1 then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], unpack(ARGV, 2))
end
redis.call('HSET', KEYS[1], 'status', final, 'completed_at', now, final .. '_at', now)
redis.call('XADD', KEYS[3], '*', 'end', final)
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[1])) end
return final
"""
)


# KEYS: pending, inflight, results. ARGV: custom_ids.
# Hands claimed but unfinished requests back (worker shutting down): they go to the
# front of pending unless a result exists. Returns how many were handed back.
RELEASE = """
local n = 0
for i = 1, #ARGV do
  if redis.call('HEXISTS', KEYS[3], ARGV[i]) == 0 and redis.call('HDEL', KEYS[2], ARGV[i]) == 1 then
    redis.call('LPUSH', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"""


# KEYS: batch, pending, results, events, inflight.
# ARGV: max count, error code, error message, final status, reason.
# Stops a batch: a user's cancel (final 'cancelled', status 'cancelling' meanwhile) or
# promptq's own stop (final 'failed': fatal upstream answer, failure rate exceeded).
# Claims refuse a stopped batch at once; up to N never-sent requests get a result with
# the given code (call again while it returns more); in-flight requests finish. The
# first stop's final status and reason win. Returns {status, remaining, became_final}.
STOP = (
    _NOW
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'', 0, 0} end
if status == 'queued' or status == 'in_progress' or status == 'validating' then
  if redis.call('HSETNX', KEYS[1], 'final_status', ARGV[4]) == 1 then
    -- kept so that requests handed back later (a worker died) end the same way
    redis.call('HSET', KEYS[1], 'reason', ARGV[5], 'stopped_at', now,
               'stop_code', ARGV[2], 'stop_message', ARGV[3])
  end
  if ARGV[4] == 'cancelled' then
    redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', now)
    status = 'cancelling'
  end
elseif status ~= 'cancelling' then
  return {status, 0, 0}
end
local ids = redis.call('LPOP', KEYS[2], tonumber(ARGV[1]))
local added = 0
if ids then
  for _, cid in ipairs(ids) do
    local line = cjson.encode({id = 'batch_req_stopped_' .. cid, custom_id = cid,
      response = cjson.null, error = {code = ARGV[2], message = ARGV[3]},
      latency_ms = cjson.null, attempts = 0})
    if redis.call('HSETNX', KEYS[3], cid, line) == 1 then
      added = added + 1
      redis.call('XADD', KEYS[4], '*', 'c', cid)
    end
  end
end
local f = redis.call('HINCRBY', KEYS[1], 'failed', added)
local remaining = redis.call('LLEN', KEYS[2])
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
local s = tonumber(redis.call('HGET', KEYS[1], 'succeeded') or '0')
if remaining == 0 and s + f >= total then
  redis.call('HSET', KEYS[1], 'finalizing_from', status, 'status', 'finalizing',
             'finalizing_at', now)
  return {'finalizing', 0, 1}
end
return {status, remaining, 0}
"""
)


# KEYS: batch, pending, inflight, results. ARGV: dead worker id.
# Recovery: requests a dead worker had claimed (and that have no result) go back to the
# front of pending. Returns how many were requeued.
REQUEUE_DEAD = """
local entries = redis.call('HGETALL', KEYS[3])
local n = 0
for i = 1, #entries, 2 do
  local cid, owner = entries[i], entries[i + 1]
  if owner == ARGV[1] then
    redis.call('HDEL', KEYS[3], cid)
    if redis.call('HEXISTS', KEYS[4], cid) == 0 then
      redis.call('LPUSH', KEYS[2], cid)
      n = n + 1
    end
  end
end
return n
"""


# KEYS: chat queue, the worker's chat hash. ARGV: max count.
# A worker takes up to N chat requests: popped from the queue and kept in its hash
# (id = the entry's first 32 characters, if they are hex) until answered. An entry
# without such an id is returned but not kept: the worker drops it. Returns the entries.
CHAT_CLAIM = """
local entries = redis.call('LPOP', KEYS[1], tonumber(ARGV[1]))
if not entries then return {} end
for _, e in ipairs(entries) do
  local id = string.sub(e, 1, 32)
  if string.match(id, '^[0-9a-f]+$') and #id == 32 then
    redis.call('HSET', KEYS[2], id, e)
  end
end
return entries
"""

# KEYS: the worker's chat hash, reply lists... ARGV: TTL seconds, then per answer:
# index of its reply list in KEYS (0: none, the request expired unanswered), id, line.
# Answers chat requests: each line goes to its API replica's reply list and the request
# leaves the worker's hash. Returns how many lines were pushed.
CHAT_REPLY = """
local pushed = 0
local touched = {}
for i = 2, #ARGV, 3 do
  local k = tonumber(ARGV[i])
  redis.call('HDEL', KEYS[1], ARGV[i + 1])
  if k > 0 then
    redis.call('RPUSH', KEYS[k], ARGV[i + 2])
    touched[k] = true
    pushed = pushed + 1
  end
end
for k, _ in pairs(touched) do redis.call('EXPIRE', KEYS[k], tonumber(ARGV[1])) end
return pushed
"""

# KEYS: chat queue, a worker's chat hash. ARGV: 'all', or 'ids' followed by ids.
# Hands unanswered chat requests back to the front of the queue (a worker shutting
# down, a dead worker, a claim whose reply was lost). Returns how many.
CHAT_REQUEUE = """
local ids = {}
if ARGV[1] == 'all' then
  ids = redis.call('HKEYS', KEYS[2])
else
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local n = 0
for _, id in ipairs(ids) do
  local e = redis.call('HGET', KEYS[2], id)
  if e then
    redis.call('HDEL', KEYS[2], id)
    redis.call('LPUSH', KEYS[1], e)
    n = n + 1
  end
end
return n
"""


class Scripts:
    """The scripts registered on one Redis client (EVALSHA with EVAL fallback)."""

    def __init__(self, redis: Redis) -> None:
        self.create = redis.register_script(CREATE)
        self.publish = redis.register_script(PUBLISH)
        self.claim = redis.register_script(CLAIM)
        self.record = redis.register_script(RECORD)
        self.finish = redis.register_script(FINISH)
        self.release = redis.register_script(RELEASE)
        self.stop = redis.register_script(STOP)
        self.requeue_dead = redis.register_script(REQUEUE_DEAD)
        self.chat_claim = redis.register_script(CHAT_CLAIM)
        self.chat_reply = redis.register_script(CHAT_REPLY)
        self.chat_requeue = redis.register_script(CHAT_REQUEUE)


def decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
