"""Request conventions of docs/api.md §1.2 and §1.7: JSON bodies, query values, pagination."""

from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from marid.api.keys import API_PREFIX, CONFIG
from marid.validation import Body, NotFound, RequestError

MAX_JSON_BODY = 1024 * 1024
_SURROGATE = re.compile("[\ud800-\udfff]")
PAGE_SIZE = 25


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
    if not storable(data):
        raise RequestError("Body text must not contain NUL characters or unpaired surrogates")
    return data


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


def path_id(request: web.Request, name: str = "id") -> int:
    """A numeric path parameter; one too large for a database id is simply not found."""
    value = int(request.match_info[name])
    if value > MAX_ID:
        raise NotFound()
    return value
