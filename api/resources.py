"""Handler logic shared by the namespaced resources: variables, keys, objects and images.

Each is owned by a user, optionally in a namespace (docs/api.md §3.1); the caller's rights on one
follow from those two (§3.2), and it is listed as "mine" (§3.3) or per namespace (§8.8).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import asyncpg
from aiohttp import web

from marid import namespaces, webhooks
from marid.api.auth import Caller
from marid.api.http import Page, api_url, path_id, query
from marid.api.keys import POOL
from marid.api.namespaces import load_namespace
from marid.listing import Listing
from marid.namespaces import Namespace, Rights
from marid.users import User
from marid.validation import Errors, NotFound


class Namespaced(Protocol):
    """What the caller's rights on a resource follow from (docs/api.md §3.2)."""

    @property
    def user_id(self) -> int: ...

    @property
    def namespace_id(self) -> int | None: ...


T = TypeVar("T", bound=Namespaced)
# The data functions of a resource module (marid/variables.py and the like).
Get = Callable[[asyncpg.Connection, int], Awaitable[T | None]]
Count = Callable[[asyncpg.Connection, Listing, str], Awaitable[int]]
PageOf = Callable[[asyncpg.Connection, Listing, str, int, int], Awaitable[list[T]]]
ToJson = Callable[[asyncpg.Connection, list[T], str], Awaitable[list[dict[str, Any]]]]


async def list_mine(
    request: web.Request, user: User, count: Count, page: PageOf[T], to_json: ToJson[T]
) -> web.Response:
    """GET /<resources>: the caller's own and those of their namespaces (docs/api.md §3.3)."""
    search = query(request, "search") or ""
    async with request.config_dict[POOL].acquire() as conn:
        listing = Listing(visible_to=user.id)
        return await page_of(request, conn, listing, search, count, page, to_json)


async def list_in_namespace(
    request: web.Request, caller: Caller, count: Count, page: PageOf[T], to_json: ToJson[T]
) -> web.Response:
    """GET N/-/<resources>: those of exactly the namespace (docs/api.md §8.8; namespace:read,
    waived when public)."""
    search = query(request, "search") or ""  # a bad value is a 400 before any 404
    async with request.config_dict[POOL].acquire() as conn:
        ns = await load_namespace(conn, request)
        caller.check_read(await namespaces.rights(conn, caller.user, ns), "namespace:read")
        listing = Listing(namespace_id=ns.id)
        return await page_of(request, conn, listing, search, count, page, to_json)


async def page_of(
    request: web.Request,
    conn: asyncpg.Connection,
    listing: Listing,
    search: str,
    count: Count,
    page: PageOf[T],
    to_json: ToJson[T],
) -> web.Response:
    """A paginated listing (docs/api.md §1.7) of the resources of `listing` matching `search`."""
    current = Page(request, await count(conn, listing, search))
    found = await page(conn, listing, search, current.offset, current.limit)
    return current.response(await to_json(conn, found, api_url(request)))


async def load(
    conn: asyncpg.Connection, request: web.Request, user: User | None, get: Get[T]
) -> tuple[T, Rights]:
    """The resource named by the URL with the caller's rights on it; NotFound if missing."""
    found = await get(conn, path_id(request))
    if found is None:
        raise NotFound()
    ns = await namespaces.get(conn, found.namespace_id) if found.namespace_id else None
    return found, await namespaces.resource_rights(conn, user, found.user_id, ns)


async def readable(
    conn: asyncpg.Connection, request: web.Request, caller: Caller, get: Get[T], *needed: str
) -> T:
    """The resource named by the URL if the caller may read it (`needed`, waived when
    public); NotFound otherwise."""
    found, rights = await load(conn, request, caller.user, get)
    caller.check_read(rights, *needed)
    return found


async def announce(
    conn: asyncpg.Connection,
    request: web.Request,
    event: str,
    action: str,
    found: T,
    to_json: ToJson[T],
    shown: dict[str, Any] | None = None,
) -> None:
    """Queue the webhook event `{"action": action, <subject>: entity}` (docs/api.md §10.6) for the
    resource's namespace, in the caller's transaction; `shown` is the entity if already
    rendered, else it is rendered only when a webhook wants the event."""

    async def payload() -> dict[str, Any]:
        entity = shown if shown is not None else (await to_json(conn, [found], api_url(request)))[0]
        return {"action": action, webhooks.SUBJECTS[event]: entity}

    await webhooks.emit(conn, found.namespace_id, event, payload)


async def usable(conn: asyncpg.Connection, request: web.Request, user: User, get: Get[T]) -> T:
    """The resource named by the URL if the caller may change or delete it (owner or
    collaborator); NotFound otherwise."""
    found, rights = await load(conn, request, user, get)
    if not rights.use:
        raise NotFound()
    return found


NameTaken = Callable[[asyncpg.Connection, int, Namespace | None, str], Awaitable[bool]]


async def resolve_and_check_name(
    conn: asyncpg.Connection,
    user: User,
    reference: str | None,
    name: str | None,
    errors: Errors,
    taken: NameTaken,
) -> Namespace | None:
    """The `namespace` (docs/api.md §3.4), then the uniqueness of `name` among the owner's
    resources of its kind (`taken`), unless either already failed."""
    ns = await namespaces.resolve(conn, user, reference, errors)
    owner_id = ns.user_id if ns else user.id
    if (
        name
        and not errors.has("name")
        and not errors.has("namespace")
        and await taken(conn, owner_id, ns, name)
    ):
        errors.add("name", "Name already exists")
    return ns
