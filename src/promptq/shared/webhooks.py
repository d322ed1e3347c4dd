"""Standard Webhooks, the pure parts: secrets, signatures, event bodies, URLs.

Deliveries are the workers' (``worker.webhooks``); producers validate a batch's URL
(``check_url``). A signature is ``v1,`` + base64 of HMAC-SHA256, keyed with the secret
(``whsec_`` + base64), over ``"<webhook-id>.<webhook-timestamp>.<body>"``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import urlsplit

import orjson
from pydantic import SecretStr

from promptq.shared.errors import ConfigError

__all__ = ["check_url", "event_body", "parse_backoff", "parse_hosts", "sign", "signing_key"]


def parse_backoff(text: str) -> tuple[float, ...]:
    """``"5,30,120"`` -> the waits after attempt 1, 2, 3 (then the event fails)."""
    try:
        waits = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"PROMPTQ_WEBHOOK_BACKOFF_S={text!r}: expected seconds separated by commas"
        ) from None
    if not waits or any(w <= 0 for w in waits):
        raise ConfigError(f"PROMPTQ_WEBHOOK_BACKOFF_S={text!r}: expected positive seconds")
    return waits


def signing_key(secret: SecretStr) -> bytes:
    """The HMAC key of a Standard Webhooks secret (``whsec_`` + base64)."""
    raw = secret.get_secret_value().removeprefix("whsec_")
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        raise ConfigError(
            "PROMPTQ_WEBHOOK_SECRET must be 'whsec_' followed by base64 (e.g. "
            "`python -c \"import base64,os; print('whsec_' + base64.b64encode(os.urandom(24))"
            '.decode())"`)'
        ) from None


def sign(key: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def parse_hosts(text: str) -> tuple[str, ...]:
    """``PROMPTQ_WEBHOOK_HOSTS``: ``"hooks.example.com, *.internal.example"`` -> its
    entries, lower case (none: any host)."""
    hosts = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    for host in hosts:
        name = host.removeprefix("*.")
        if not name or "*" in name or "/" in name or ":" in name:
            raise ConfigError(
                f"PROMPTQ_WEBHOOK_HOSTS: {host!r} is not a host name; give names such as "
                "'hooks.example.com' or '*.example.com', separated by commas"
            )
    return hosts


def host_allowed(host: str, hosts: tuple[str, ...]) -> bool:
    """Whether ``host`` is one of ``hosts`` (``*.example.com``: any name under it)."""
    host = host.lower().rstrip(".")
    if not hosts:
        return True
    return any(
        host.endswith(entry[1:]) if entry.startswith("*.") else host == entry for entry in hosts
    )


def check_url(url: str, hosts: tuple[str, ...] = ()) -> str:
    """An http(s) URL with a host (one of ``hosts`` when there are any), or
    ``ConfigError`` saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"webhook URL {url!r}: expected http:// or https:// and a host")
    if not host_allowed(parts.hostname, hosts):
        raise ConfigError(
            f"webhook URL {url!r}: host {parts.hostname!r} is not one PROMPTQ_WEBHOOK_HOSTS "
            f"allows ({', '.join(hosts)})"
        )
    return url


def event_body(batch_id: str, kind: str, created_at: float) -> bytes:
    return orjson.dumps(
        {
            "id": f"evt_{batch_id}",
            "object": "event",
            "type": f"batch.{kind}",
            "created_at": int(created_at),
            "data": {"id": batch_id},
        }
    )
