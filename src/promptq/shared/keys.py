"""Every Redis key promptq uses, built in one place.

All keys start with ``promptq:``. Keys of one batch carry the batch id in a hash tag
(``{ID}``, braces literal) so a batch lives in one Redis Cluster slot and our Lua
scripts may touch all of them at once.

arq keeps its own job keys under its fixed ``arq:`` prefix (``arq:job:*``,
``arq:in-progress:*``, ``arq:retry:*``); only its queue is named by us. Callers do not
assemble keys themselves: the stores (``shared.batches``, ``shared.chatqueue``,
``shared.registry``) hand them to their scripts.
"""

from __future__ import annotations

import re

PREFIX = "promptq"

# Batch and custom ids end up inside keys and hash fields: keep them to a safe alphabet
# so no id can forge another key (no braces, colons or whitespace in batch ids).
BATCH_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: arq queue (sorted set of job ids): the aggregator jobs, a fallback for the in-process
#: aggregation of the worker that recorded a batch's last result.
QUEUE = f"{PREFIX}:queue"
#: Pub/sub channel: a message says a batch has requests to claim; idle workers claim at
#: once instead of at their next poll.
WAKEUP_CHANNEL = f"{PREFIX}:wakeup"
#: Sorted set: batches with requests waiting to be claimed, scored by their next turn
#: (ms, Redis' clock; urgent batches 60 s ahead). Workers claim from the lowest score;
#: each claim moves the batch to the back of its lane (round robin between batches).
RUNNABLE = f"{PREFIX}:runnable"
#: Sorted set of batch ids scored by creation time (unix seconds).
BATCHES = f"{PREFIX}:batches"
#: Set of batch ids that may have queued requests (backpressure sums their queues).
ACTIVE = f"{PREFIX}:batches:active"
#: Sorted set: finished batches scored by when their keys are to go (unix seconds, Redis'
#: clock); workers UNLINK them then, so no big key is ever freed on Redis' main thread.
SWEEP = f"{PREFIX}:sweep"
#: Sorted set of worker ids scored by their last heartbeat (unix seconds, Redis' clock).
WORKERS = f"{PREFIX}:workers"
#: Sorted set: the shards of batches of the batch-api route (members ``<batch id>:<k>``),
#: scored by when their next step is due (ms, Redis' clock); a worker taking one leases it
#: by moving its score ahead (``shared.batches``, "Shards").
SHARDS = f"{PREFIX}:shards"


def batch(batch_id: str) -> str:
    """Hash: status, counters and timestamps of a batch."""
    return f"{PREFIX}:batch:{{{batch_id}}}"


def stats(batch_id: str) -> str:
    """Hash: the aggregator's statistics."""
    return f"{batch(batch_id)}:stats"


def requests(batch_id: str) -> str:
    """Hash: custom_id -> request JSON (``{"custom_id", "body", "line"}``)."""
    return f"{batch(batch_id)}:requests"


def pending(batch_id: str) -> str:
    """List: custom_ids not yet claimed by a worker, in input order."""
    return f"{batch(batch_id)}:pending"


def order(batch_id: str) -> str:
    """List: every custom_id in input order (``promptq results --order input``)."""
    return f"{batch(batch_id)}:order"


def inflight(batch_id: str) -> str:
    """Hash: custom_id -> claiming worker id, for requests being processed."""
    return f"{batch(batch_id)}:inflight"


def results(batch_id: str) -> str:
    """Hash: custom_id -> result line JSON (exactly one per custom_id)."""
    return f"{batch(batch_id)}:results"


def tally(batch_id: str) -> str:
    """Hash: the running tally of recorded results (``in``/``out`` tokens, ``lat_n``,
    ``lat_sum``, ``lat_max``, ``h:<bucket>`` latency histogram, ``e:<code>`` errors);
    the aggregator's stats come from it."""
    return f"{batch(batch_id)}:tally"


def events(batch_id: str) -> str:
    """Stream: one entry per finished request (field ``c`` = custom_id), then ``end``."""
    return f"{batch(batch_id)}:events"


def claims(batch_id: str) -> str:
    """Hash: claim token -> the custom_ids that claim took (a claim sent again gets the
    same ones back); one entry per worker at most, deleted when the batch finishes."""
    return f"{batch(batch_id)}:claims"


def shards(batch_id: str) -> str:
    """Hash: the batch-api route's shards of a batch, fields ``<k>:<name>``: ``start`` and
    ``end`` (its lines in the input order list), ``bytes``, ``state``, ``lease``, the
    provider's ``file_id`` and ``provider_batch``, ``output_file``, ``error_file``,
    ``provider_status``, ``errors``, ``cursor`` (settling)."""
    return f"{batch(batch_id)}:shards"


def shard_member(batch_id: str, shard: int) -> str:
    """A shard's member in the ``SHARDS`` index."""
    return f"{batch_id}:{shard}"


def batch_keys(batch_id: str) -> list[str]:
    """Every key of a batch (for inspection and clean-up)."""
    return [
        batch(batch_id),
        stats(batch_id),
        requests(batch_id),
        pending(batch_id),
        order(batch_id),
        inflight(batch_id),
        results(batch_id),
        events(batch_id),
        claims(batch_id),
        tally(batch_id),
        shards(batch_id),
    ]


def worker(worker_id: str) -> str:
    """Hash with a TTL: a worker's heartbeat (host, pid, in_flight, done, failed...)."""
    return f"{PREFIX}:worker:{worker_id}"


# -- the chat lane (POST /v1/chat/completions) ---------------------------------------------
# Chat requests skip batches: they wait in one list that workers pop from before any
# batch work. All chat keys share the ``{chat}`` hash tag so one script can move an
# entry between them (Redis Cluster).

#: List: chat requests waiting for a worker, each ``<32 hex id><JSON>`` (``api.lane``).
CHAT_QUEUE = f"{PREFIX}:{{chat}}:queue"
#: Wake-up message that says "chat requests are waiting" (any other says "poll arq").
CHAT_WAKEUP = b"chat"
#: Length of a chat request id (uuid4 hex), the prefix of its queue entry.
CHAT_ID_LEN = 32
#: Chat request ids (and API replica ids) are hex: safe inside keys and Lua.
CHAT_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def worker_chat(worker_id: str) -> str:
    """List: chat queue entries a worker has taken (BLMOVE) and not answered yet (a dead
    worker's go back to the front of the chat queue)."""
    return f"{PREFIX}:{{chat}}:worker:{worker_id}"


def chat_pushed(replica_id: str) -> str:
    """String with a TTL: the number of an API replica's last push of chat requests (a
    push sent again after a lost reply queues nothing twice)."""
    return f"{PREFIX}:{{chat}}:pushed:{replica_id}"


def chat_replies(replica_id: str) -> str:
    """List with a TTL: result lines for the API replica that is waiting for them."""
    return f"{PREFIX}:{{chat}}:replies:{replica_id}"


#: Sorted set: webhook deliveries, batch id -> when the next attempt is due (ms on Redis'
#: clock; a claimed one is leased ahead: ``worker.webhooks``).
WEBHOOKS = f"{PREFIX}:webhooks"


def webhook(batch_id: str) -> str:
    """Hash: a finished batch's webhook event (url, type, created_at, attempts, status
    pending|delivered|failed, last_error, delivered_at); it lives as long as the batch."""
    return f"{PREFIX}:webhook:{{{batch_id}}}"


def chat_cancel(chat_id: str) -> str:
    """String with a TTL: the client of a streamed chat-lane request has gone; the worker
    streaming it stops the upstream request and deletes this."""
    return f"{PREFIX}:{{chat}}:cancel:{chat_id}"


def chat_delivering(replica_id: str) -> str:
    """List: answers an API replica took from its reply list (read again after a dropped
    connection; deleted now and then once handed out)."""
    return f"{PREFIX}:{{chat}}:delivering:{replica_id}"


#: Hash: latency histogram of finished requests, fields = bucket upper bounds in ms
#: (non-cumulative counts) plus ``sum`` (ms) and ``count``; read by /metrics.
METRICS_LATENCY = f"{PREFIX}:metrics:latency_ms"
LATENCY_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


def ratelimit(scope: str) -> str:
    """Hash: cluster-wide limiter state of one upstream (+ model): ``req_tat``,
    ``tok_tat`` (GCRA theoretical arrival times, ms) and ``cooldown_until`` (ms)."""
    return f"{PREFIX}:ratelimit:{{{scope}}}"


def cache(digest: str) -> str:
    """String with a TTL: the upstream's answer (body JSON) to a request whose endpoint and
    canonical body hash to ``digest`` (sha256 hex)."""
    return f"{PREFIX}:cache:{{{digest}}}"


def cache_lock(digest: str) -> str:
    """String with a short TTL: the worker sending that request now (others wait)."""
    return f"{cache(digest)}:lock"


def breaker(scope: str) -> str:
    """Hash: an upstream's circuit breaker while it refuses connections: ``down_since``,
    ``probe_at``, ``interval_ms`` (ms, Redis' clock), ``reason``; gone when it answers."""
    return f"{PREFIX}:breaker:{{{scope}}}"


def aggregate_job_id(batch_id: str) -> str:
    """arq job id of a batch's aggregator job: fixed, so arq refuses a second copy."""
    return f"promptq-aggregate-{batch_id}"


# -- the HTTP API (`promptq serve`) -------------------------------------------------------

#: Ids of files uploaded over HTTP (``file-`` + 32 hex digits), safe inside a hash tag.
FILE_ID_RE = re.compile(r"^file-[0-9a-f]{32}$")


#: Sorted set: uploaded file ids scored by upload time (GET /v1/files); ids whose file
#: expired are dropped when a listing meets them.
FILES = f"{PREFIX}:files"


def file(file_id: str) -> str:
    """Hash with a TTL: an uploaded file's metadata (filename, bytes, lines, purpose,
    created_at, expires_at)."""
    return f"{PREFIX}:file:{{{file_id}}}"


def file_content(file_id: str) -> str:
    """String with a TTL: an uploaded file's bytes."""
    return f"{file(file_id)}:content"


def batch_api(batch_id: str) -> str:
    """Hash: what a batch created over HTTP was created with (input_file_id,
    completion_window, metadata JSON, created_at, validate_by)."""
    return f"{batch(batch_id)}:api"
