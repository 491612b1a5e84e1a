"""Request conventions of docs/api.md §1.1, §1.2 and §1.7: JSON and form bodies, the wait for
a body's bytes, query values, path numbers, URLs and pagination."""

from __future__ import annotations

import asyncio
import json
import math
import re
import zlib
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.helpers import BaseTimerContext
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import MultiDictProxy

from marid import jobs
from marid.api.keys import API_PREFIX, CONFIG
from marid.validation import Body, NotFound, RequestError, ValidationError

MAX_JSON_BODY = 1024 * 1024
MAX_DEPTH = 64  # JSON nesting: objects and arrays inside each other
_SURROGATE = re.compile("[\ud800-\udfff]")
PAGE_SIZE = 25

# Field-keyed answers (docs/api.md §1.4) for bodies that cannot be read at all.
TOO_DEEP = f"Request body nests too deeply (limit {MAX_DEPTH} levels)"
NO_BOUNDARY = "Multipart body needs a boundary parameter in its Content-Type"
BAD_PART_HEADERS = "Multipart body has malformed part headers"
BAD_FORM = "Form body is malformed or not in its declared encoding"


async def read_json(request: web.Request) -> Any:
    """The parsed JSON body (any Content-Type); an empty body is {}."""
    if request.content_length is not None and request.content_length > MAX_JSON_BODY:
        raise RequestError("Request body too large", 413)
    raw = await request.read()  # the app's client_max_size stops chunked bodies at 1 MiB
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        raise RequestError("Malformed JSON body") from None
    except RecursionError:  # nested past the interpreter's limit (about 1000 levels)
        raise body_error(TOO_DEEP) from None
    if depth(data) > MAX_DEPTH:
        raise body_error(TOO_DEEP)
    if not storable(data):
        raise RequestError("Body text must not contain NUL characters or unpaired surrogates")
    return data


def body_error(text: str) -> ValidationError:
    return ValidationError({"body": [text]})


def depth(value: Any) -> int:
    """How many objects and arrays `value` nests inside each other (a scalar is 0), counted
    without recursion."""
    deepest = 0
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, at = stack.pop()
        deepest = max(deepest, at)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, at + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def storable(value: Any) -> bool:
    """False when any string in `value` holds text PostgreSQL cannot store (NUL, lone
    surrogates), which JSON escapes (\\u0000, \\ud800) can smuggle in."""
    if isinstance(value, str):
        return "\x00" not in value and not _SURROGATE.search(value)
    if isinstance(value, list):
        return all(storable(item) for item in value)
    if isinstance(value, dict):
        return all(storable(k) and storable(v) for k, v in value.items())
    return True


async def read_body(request: web.Request) -> Body:
    """The JSON body as a field reader; anything but an object is a request error."""
    data = await read_json(request)
    if not isinstance(data, dict):
        raise RequestError("Body must be a JSON object")
    return Body(data)


# Content users uploaded or builds produced (objects, artifacts, job output) is served from the
# web interface's origin (docs/web.md §4): a browser must never run it there as a page of
# marid's. `sandbox` gives such a document an origin of its own and no scripts.
UNTRUSTED_CONTENT = {
    "Content-Security-Policy": "sandbox; default-src 'none'",
    "X-Content-Type-Options": "nosniff",
}


def query(request: web.Request, name: str) -> str | None:
    """The first value of a query parameter (repeats are ignored)."""
    values = request.query.getall(name, [])
    if values and not storable(values[0]):
        raise RequestError(f"Query parameter {name} must not contain NUL characters")
    return values[0] if values else None


def query_flag(request: web.Request, name: str) -> bool | None:
    """A boolean query value: `true`, `1`, `` are true; `false`, `0` false; else None."""
    value = query(request, name)
    if value is None:
        return None
    return {"true": True, "1": True, "": True, "false": False, "0": False}.get(value.lower())


def api_url(request: web.Request) -> str:
    return request.config_dict[CONFIG].server.api_url


def absolute_url(request: web.Request, **params: str) -> str:
    """The request's URL under the configured API base, query re-encoded sorted by name."""
    base = api_url(request)
    prefix = request.app.get(API_PREFIX, "")
    path = (
        request.path[len(prefix) :] if prefix and request.path.startswith(prefix) else request.path
    )
    values = {name: query(request, name) or "" for name in request.query}
    values.update(params)
    return f"{base}{path}?{urlencode(sorted(values.items()))}"


class Page:
    """One page of a paginated listing (docs/api.md §1.7)."""

    def __init__(self, request: web.Request, total: int) -> None:
        self.last = max(1, math.ceil(total / PAGE_SIZE))
        try:
            requested = int(query(request, "page") or "1")
        except ValueError:
            requested = 1
        self.number = min(max(requested, 1), self.last)
        self.offset = (self.number - 1) * PAGE_SIZE
        self.limit = PAGE_SIZE
        prev_url = absolute_url(request, page=str(max(1, self.number - 1)))
        next_url = absolute_url(request, page=str(min(self.last, self.number + 1)))
        self.link = f'<{prev_url}>; rel="prev", <{next_url}>; rel="next"'

    def response(self, items: list[Any]) -> web.Response:
        return web.json_response(items, headers={"Link": self.link})


MAX_ID = 2**63 - 1
MAX_NUMBER = 2**31 - 1  # build numbers


def path_id(request: web.Request, name: str = "id", maximum: int = MAX_ID) -> int:
    """A numeric path parameter (the route allows digits only); one too large for a database
    id is simply not found, however many digits it has (int() refuses 4,300 and more)."""
    digits = request.match_info[name].lstrip("0")
    if len(digits) > len(str(maximum)):
        raise NotFound()
    value = int(digits or "0")
    if value > maximum:
        raise NotFound()
    return value


def url_path(name: str) -> str:
    """An artifact's or tag's name (which may hold `/`) as URL path segments, each encoded by
    `jobs.url_segment`: `a b?c#d.txt` is `a%20b%3Fc%23d.txt`, `dist/a b` is `dist/a%20b`."""
    return "/".join(jobs.url_segment(part) for part in name.split("/"))


# --- bodies ----------------------------------------------------------------------------------


async def multipart_reader(request: web.Request) -> MultipartReader:
    """The reader of a `multipart/form-data` body; a Content-Type without a boundary is a
    field-keyed 400 (aiohttp raises ValueError)."""
    try:
        return await request.multipart()
    except ValueError:
        raise body_error(NO_BOUNDARY) from None


async def next_part(reader: MultipartReader) -> MultipartReader | BodyPartReader | None:
    """The next part of a multipart body; a part whose headers are malformed (a control
    character, a line without a colon, too many or too long ones) is a field-keyed 400."""
    try:
        return await reader.next()
    except HttpProcessingError:  # aiohttp's header parser: InvalidHeader, LineTooLong, ...
        raise body_error(BAD_PART_HEADERS) from None


async def read_form(request: web.Request) -> MultiDictProxy[Any]:
    """The form values of a POST (urlencoded or multipart/form-data, as the OAuth endpoints of
    docs/api.md §16 take them). A body that cannot be read as a form is a field-keyed 400: no
    multipart boundary, malformed part headers, text not in its declared charset or transfer
    encoding, an unknown charset."""
    if request.content_type == "multipart/form-data":
        await multipart_reader(request)  # the boundary, checked before aiohttp reads
    try:
        return await request.post()
    except HttpProcessingError:
        raise body_error(BAD_PART_HEADERS) from None
    except (ValueError, LookupError, zlib.error):  # decoding; LookupError: an unknown charset
        raise body_error(BAD_FORM) from None
    except RuntimeError as exc:
        if "encoding" not in str(exc) and "charset" not in str(exc):
            raise  # e.g. "Connection closed."
        raise body_error(BAD_FORM) from None


# --- the wait for a body's bytes (docs/configuration.md §1, server.body_timeout) ---------------


class BodyTimeout(TimeoutError):
    """No byte of the request body came for `server.body_timeout` seconds while the handler
    waited for one. A TimeoutError, so that aiohttp's own read of an unread body's rest after
    the response (its "lingering") stops quietly on it too."""


class BodyTimer(BaseTimerContext):
    """aiohttp's StreamReader enters its timer around every wait for the next bytes of the
    body (`StreamReader._wait`): this one ends a wait after `seconds` by failing the stream
    with BodyTimeout. A body that keeps coming never trips it, however long it takes."""

    def __init__(self, stream: StreamReader, seconds: float) -> None:
        self.stream = stream
        self.seconds = seconds
        self.handle: asyncio.TimerHandle | None = None

    def __enter__(self) -> BaseTimerContext:
        self.handle = asyncio.get_running_loop().call_later(self.seconds, self._expire)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _expire(self) -> None:
        self.handle = None
        self.stream.set_exception(BodyTimeout(f"no body bytes for {self.seconds:g}s"))


REQUEST_TIMEOUT = "Request body timed out: no data for too long"


@web.middleware
async def body_timeout(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Bound each wait for the next bytes of the request body by `server.body_timeout`; a
    request whose body stops coming ends with 408, and its connection is closed."""
    seconds = request.config_dict[CONFIG].server.body_timeout
    stream = request.content
    if seconds > 0 and request.body_exists and isinstance(stream, StreamReader):
        stream._timer = BodyTimer(stream, seconds)  # aiohttp's hook: see BodyTimer
    try:
        return await handler(request)
    except BodyTimeout:
        response = web.json_response({"message": REQUEST_TIMEOUT}, status=408)
        response.force_close()
        return response
