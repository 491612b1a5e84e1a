"""The one place where exceptions become HTTP responses (docs/api.md §1.4)."""

from __future__ import annotations

import logging
import secrets
import time
import traceback
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from marid.api.keys import API_PREFIX, CONFIG, HTTP_METRICS
from marid.logs import REQUEST_ID
from marid.validation import NotFound, RequestError, ValidationError

log = logging.getLogger(__name__)
access_log = logging.getLogger("marid.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STANDARD = {
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request body too large",
}


def message(text: str, status: int, **kwargs: object) -> web.Response:
    return web.json_response({"message": text}, status=status, **kwargs)  # type: ignore[arg-type]


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render ValidationError, RequestError, NotFound and HTTP errors as JSON; hide crashes."""
    try:
        return await handler(request)
    except ValidationError as exc:
        return web.json_response(exc.errors, status=400)
    except RequestError as exc:
        return message(exc.message, exc.status, headers=exc.headers)
    except NotFound:
        return message("Not Found", 404)
    except (
        asyncpg.CharacterNotInRepertoireError,
        asyncpg.UntranslatableCharacterError,
        UnicodeEncodeError,
    ):
        # Text PostgreSQL cannot hold that slipped past the request checks (e.g. a path
        # segment with %00). Not logged: the offending value may be a secret.
        return message("Request text must not contain NUL characters or unpaired surrogates", 400)
    except web.HTTPException as exc:
        if exc.status in STANDARD:
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return message(STANDARD[exc.status], exc.status, headers=headers)
        raise
    except Exception as exc:
        log.exception("unhandled error on %s %s", request.method, request.path)
        body = {"message": "Internal Server Error"}
        if request.config_dict[CONFIG].server.debug:
            body["stack"] = "".join(traceback.format_exception(exc))
        return web.json_response(body, status=500)


@web.middleware
async def request_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give each request an id (X-Request-Id) and log one line when it ends."""
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _safe_id(incoming) else secrets.token_hex(8)
    token = REQUEST_ID.set(request_id)
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-Id"] = request_id
        return response
    except web.HTTPException as exc:
        status = exc.status
        exc.headers["X-Request-Id"] = request_id
        raise
    finally:
        elapsed = time.perf_counter() - start
        # The path only: query strings may carry secrets (OAuth codes, tokens).
        access_log.info("%s %s %d %.1fms", request.method, request.path, status, elapsed * 1000)
        metrics = request.config_dict.get(HTTP_METRICS)
        if metrics is not None:
            method = request.method if request.method in METHODS else "other"
            metrics.observe(method, _route(request), status, elapsed)
        REQUEST_ID.reset(token)


# Methods kept as metric labels; any other becomes "other", so clients cannot add label values.
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


def _route(request: web.Request) -> str:
    """The path template that matched, relative to the API base (`/b/{username}/{number}`);
    "" when no route matched, so scanners cannot grow the metrics without bound."""
    resource = request.match_info.route.resource
    if resource is None:
        return ""
    template = resource.canonical
    prefix = request.match_info.apps[-1].get(API_PREFIX, "")  # the app that owns the route
    if prefix and template.startswith(prefix + "/"):
        return template[len(prefix) :]
    return template


def _safe_id(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isalnum() or c in "-_." for c in value)
