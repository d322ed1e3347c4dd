"""Bearer-token auth: ``Authorization: Bearer $PROMPTQ_API_TOKEN`` on every route but
``/healthz``. With no token configured every request is let through (``promptq serve``
then binds loopback only, unless told otherwise)."""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import SecretStr

from promptq.api.errors import ApiError, Handler

#: Routes without credentials: the probe of a load balancer or orchestrator, and the
#: dashboard's page (it holds no data; it asks for the token, then sends it).
PUBLIC_PATHS = frozenset({"/healthz", "/"})

_MISSING = (
    "Missing bearer token: send 'Authorization: Bearer <token>' with the token the server "
    "was started with (PROMPTQ_API_TOKEN); with the openai SDK pass it as api_key."
)
_WRONG = "Incorrect bearer token: it does not match the server's PROMPTQ_API_TOKEN."


def auth_middleware(token: SecretStr | None) -> Middleware:
    expected = token.get_secret_value().encode() if token is not None else None

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or request.path in PUBLIC_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _unauthorized(_MISSING, code="missing_api_key")
        # Constant-time comparison: the time taken must not tell how much of it matched.
        if not hmac.compare_digest(given.strip().encode(), expected):
            raise _unauthorized(_WRONG, code="invalid_api_key")
        return await handler(request)

    return check_token


def _unauthorized(message: str, *, code: str) -> ApiError:
    return ApiError(401, message, code=code, headers={"WWW-Authenticate": 'Bearer realm="promptq"'})


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
