"""Rate limiting (docs/api.md §20): fixed windows per key, counted in this process.

The key is the bearer token when it is valid, the user for valid Basic credentials, otherwise
the client's address (the first X-Forwarded-For entry only when the peer is a trusted proxy).
Both lookups are the ones the handler would do anyway, cached on the request, so limiting adds
no query of its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from marid.api.auth import basic, bearer, session_of
from marid.api.keys import HTTP_METRICS, RATE_LIMITER
from marid.ratelimit import Limiter

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEADERS = web.RequestKey("rate_limit_headers", dict[str, str])


@web.middleware
async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer 429 past the key's limit; otherwise count the request and let `add_headers`
    put the X-RateLimit headers on whatever response it gets (streamed ones too)."""
    limiter = request.config_dict.get(RATE_LIMITER)
    if limiter is None or request.path.startswith(limiter.runner_paths):
        # The runner protocol (api/runner.py): a runner's requests are its builds' work,
        # authenticated by tokens too long to guess.
        return await handler(request)
    settings = limiter.settings
    caller = await basic(request) or await bearer(request)
    session = await session_of(request) if caller.user is None else None
    if caller.token_id is not None:
        key, limit = f"token:{caller.token_id}", settings.authenticated
    elif caller.user is not None:
        key, limit = f"user:{caller.user.id}", settings.authenticated
    elif session is not None:  # a signed-in browser (api/web) counts as its user
        key, limit = f"user:{session.user.id}", settings.authenticated
    else:
        key, limit = f"ip:{client(limiter, request)}", settings.anonymous
    now = time.time()
    if request.method == "GET" and request.path in limiter.uncounted:  # health, metrics
        allowed, remaining, reset = limiter.peek(key, limit, now)
    else:
        allowed, remaining, reset = limiter.take(key, limit, now)
    headers = {
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(reset),
    }
    request[HEADERS] = headers
    if not allowed:
        request.config_dict[HTTP_METRICS].rate_limited += 1
        retry = {"Retry-After": str(max(1, math.ceil(reset - now)))}
        return web.json_response({"message": "Rate limit exceeded"}, status=429, headers=retry)
    return await handler(request)


def client(limiter: Limiter, request: web.Request) -> str:
    """The client's address (Limiter.client)."""
    return limiter.client(request.remote or "", request.headers.get("X-Forwarded-For", ""))


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the X-RateLimit headers of a counted request (docs/api.md §20)."""
    headers = request.get(HEADERS)
    if headers is not None:
        response.headers.update(headers)
