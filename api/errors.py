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
from marid.api.live import LIVE
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


# A database outage answers 503 with this message and Retry-After (docs/api.md §1.4). Five
# seconds: a PostgreSQL restart takes a few, the pool reconnects on the first request after it,
# and a client that waits this long is served again within 5 s of the return (issue 10).
RETRY_AFTER = 5
UNAVAILABLE = "The database is unavailable; try again shortly"
RETRY_HEADERS = {"Retry-After": str(RETRY_AFTER)}
# asyncpg's InterfaceError also means misuse (e.g. two queries at once on one connection): only
# these texts mean the connection went away (asyncpg 0.32: a plain connection used after the
# server closed it; a pooled one, which asyncpg releases to the pool when it is lost; a
# transaction ending on such a connection).
CLOSED_TEXTS = (
    "connection is closed",
    "connection has been released back to the pool",
    "the underlying connection is closed",
)
# A FATAL error on an idle connection (57P01 from a fast shutdown) puts asyncpg's protocol in
# its error-consuming state (2) until the server's close arrives; a query in between gets this.
FATAL_WHILE_IDLE = "another operation (2) is in progress"


def message(text: str, status: int, **kwargs: object) -> web.Response:
    return web.json_response({"message": text}, status=status, **kwargs)  # type: ignore[arg-type]


def database_unavailable(exc: BaseException) -> str | None:
    """Why `exc` means PostgreSQL is unreachable or going away, or None for any other error.

    What asyncpg raises in each case was found by stopping, starting, freezing and
    terminating a real cluster (docs/api.md §1.4 lists the reasons).
    """
    if isinstance(exc, asyncpg.CannotConnectNowError):  # 57P03: starting up or shutting down
        return "not accepting connections"
    if isinstance(exc, asyncpg.ObjectNotInPrerequisiteStateError) and _raised_in(
        exc, "asyncpg.connect_utils"
    ):  # 55000 when connecting: ALTER DATABASE … ALLOW_CONNECTIONS false
        return "not accepting connections"
    if isinstance(exc, asyncpg.TooManyConnectionsError):  # 53300
        return "too many connections"
    if isinstance(exc, (asyncpg.ClientCannotConnectError, asyncpg.ConnectionRejectionError)):
        return "not reachable"
    if isinstance(exc, asyncpg.ProtocolViolationError):  # 08P01 is a bug, not an outage
        return None
    # 08003 "connection was closed in the middle of operation" (its cause: 57P01, a fast
    # shutdown or pg_terminate_backend), 08006, 08007 (lost during COMMIT), 57P01 and 57P02.
    lost = (asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError, asyncpg.CrashShutdownError)
    if isinstance(exc, lost):
        return "connection lost"
    if isinstance(exc, asyncpg.InterfaceError) and any(t in str(exc) for t in CLOSED_TEXTS):
        return "connection lost"
    if isinstance(exc, asyncpg.InternalClientError) and FATAL_WHILE_IDLE in str(exc):
        return "connection lost"
    # Connecting: refused (server down) or timed out (a frozen server; a pool acquire timeout).
    # Only when asyncpg raised them: the blob store and outbound HTTP raise these too.
    if isinstance(exc, TimeoutError) and _raised_in(exc, "asyncpg"):  # before OSError, its base
        return "not answering"
    if isinstance(exc, OSError) and _raised_in(exc, "asyncpg"):
        return "not reachable"
    return None


def _raised_in(exc: BaseException, module: str) -> bool:
    """Whether `exc` passed through code of `module` (or a module inside it)."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        name = frame.f_globals.get("__name__", "")
        if name == module or name.startswith(module + "."):
            return True
    return False


def note_outage(request: web.Request, reason: str) -> None:
    """Tell this process's database watch (api/live.py) that a request found the database
    away: it logs the outage once and its end when the database answers again."""
    live = request.config_dict.get(LIVE)
    if live is not None:
        live.database_away(reason)


def unavailable() -> web.Response:
    return message(UNAVAILABLE, 503, headers=RETRY_HEADERS)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render ValidationError, RequestError, NotFound and HTTP errors as JSON; a database
    outage as 503; hide crashes."""
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
        reason = database_unavailable(exc)
        if reason is not None:  # logged once per outage, not per request
            note_outage(request, reason)
            return unavailable()
        log.exception("unhandled error on %s", printable(f"{request.method} {request.path}"))
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
        # The path only: query strings may carry secrets (OAuth codes, tokens). Both come from
        # the client: escaped, so that `%0A` in a path cannot start a forged log line.
        what = printable(f"{request.method} {request.path}")
        access_log.info("%s %d %.1fms", what, status, elapsed * 1000)
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


def printable(text: str) -> str:
    """`text` for a log line, with every character that is not printable escaped as Python
    writes it (`\\n`, `\\x85`, `\\u2028`, `\\ud800`), and `\\` as `\\\\`: control characters,
    line and paragraph separators, format characters such as bidirectional overrides and lone
    surrogates. No client-sent text can then end a log line or pass for an escape."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(char) for char in text)


def _escape(char: str) -> str:
    if char.isprintable() and char != "\\":
        return char
    return char.encode("unicode_escape").decode("ascii")


def _safe_id(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isalnum() or c in "-_." for c in value)
