"""Build caches (docs/api.md §26): list and delete the entries a namespace's builds, or the
caller's builds without a namespace, saved (docs/manifest.md §10)."""

from __future__ import annotations

import contextlib
import logging

import asyncpg
from aiohttp import web

from marid import caches, namespaces
from marid.api.auth import Caller, optional, requires
from marid.api.http import Page, api_url
from marid.api.keys import BLOBS, POOL
from marid.api.namespaces import NS, NS_PARAMS, load_namespace
from marid.api.openapi import (
    BEARER,
    INT,
    NOT_FOUND,
    OPTIONAL,
    STRING,
    TIME,
    URL,
    Operations,
    json_response,
    list_of,
    nullable,
    obj,
    op,
    path_param,
    query_param,
    ref,
)
from marid.caches import Scope
from marid.users import User
from marid.validation import NotFound

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
KEY = "/{key}"


@routes.get("/caches")
@requires("build:read")
async def list_caches(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        return await _page(request, conn, Scope(user.id, None), f"{api_url(request)}/caches")


@routes.get("/caches" + KEY)
@requires("build:read")
async def show_cache(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        return await _show(request, conn, Scope(user.id, None), f"{api_url(request)}/caches")


@routes.delete("/caches")
@requires("build:delete")
async def delete_caches(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        stale = await caches.delete(conn, Scope(user.id, None), None)
    return await _deleted(request, stale, every=True)


@routes.delete("/caches" + KEY)
@requires("build:delete")
async def delete_cache(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        stale = await caches.delete(conn, Scope(user.id, None), [request.match_info["key"]])
    return await _deleted(request, stale)


@routes.get(NS + "/-/caches")
@optional
async def list_namespace_caches(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        scope, base = await _readable(request, conn, caller)
        return await _page(request, conn, scope, base)


@routes.get(NS + "/-/caches" + KEY)
@optional
async def show_namespace_cache(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        scope, base = await _readable(request, conn, caller)
        return await _show(request, conn, scope, base)


@routes.delete(NS + "/-/caches")
@requires("build:delete")
async def delete_namespace_caches(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        stale = await caches.delete(conn, await _usable(request, conn, user), None)
    return await _deleted(request, stale, every=True)


@routes.delete(NS + "/-/caches" + KEY)
@requires("build:delete")
async def delete_namespace_cache(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        scope = await _usable(request, conn, user)
        stale = await caches.delete(conn, scope, [request.match_info["key"]])
    return await _deleted(request, stale)


async def _readable(
    request: web.Request, conn: asyncpg.Connection, caller: Caller
) -> tuple[Scope, str]:
    """The namespace's scope and caches URL if the caller may see its builds (build:read,
    waived when public, as for its builds); NotFound otherwise."""
    ns = await load_namespace(conn, request)
    caller.check_read(await namespaces.rights(conn, caller.user, ns), "build:read")
    return Scope(ns.user_id, ns.id), f"{ns.url(api_url(request))}/-/caches"


async def _usable(request: web.Request, conn: asyncpg.Connection, user: User) -> Scope:
    """The namespace's scope if the user may change it (owner or collaborator)."""
    ns = await load_namespace(conn, request)
    if not (await namespaces.rights(conn, user, ns)).use:
        raise NotFound()
    return Scope(ns.user_id, ns.id)


async def _page(
    request: web.Request, conn: asyncpg.Connection, scope: Scope, base: str
) -> web.Response:
    current = Page(request, await caches.count(conn, scope))
    found = await caches.page(conn, scope, current.offset, current.limit)
    return current.response([caches.to_json(e, base, api_url(request)) for e in found])


async def _show(
    request: web.Request, conn: asyncpg.Connection, scope: Scope, base: str
) -> web.Response:
    entry = await caches.get(conn, scope, request.match_info["key"])
    if entry is None:
        raise NotFound()
    return web.json_response(caches.to_json(entry, base, api_url(request)))


async def _deleted(request: web.Request, stale: list[str], every: bool = False) -> web.Response:
    """204 once the deleted entries' blobs are gone (after the commit: a rolled-back delete
    must still find them); 404 for one entry that was not there."""
    if not stale and not every:
        raise NotFound()
    for key in stale:
        with contextlib.suppress(Exception):  # else the API's reaper removes it later
            await request.config_dict[BLOBS].delete(key)
    log.info("%d cache entries deleted", len(stale))
    return web.Response(status=204)


SCHEMAS = {
    "Cache": obj(
        {
            "key": STRING,
            "paths": {"type": "array", "items": STRING},
            "size": {**INT, "description": "bytes of the stored tar"},
            "created_at": TIME,
            "last_used_at": {**TIME, "description": "last saved or restored: the LRU order"},
            "build_url": {**nullable(URL), "description": "the build that saved it"},
            "url": URL,
        }
    ),
}
CACHE_KEY = [path_param("key", "the cache's key (docs/manifest.md §10)")]
PAGE = [query_param("page", "page number, 25 items a page", INT)]
OPERATIONS: Operations = {
    ("get", "/caches"): op(
        "Caches of the caller's builds without a namespace (build:read)",
        {"200": json_response("OK", list_of("Cache")), **NOT_FOUND},
        security=BEARER,
        extension=True,
        parameters=PAGE,
    ),
    ("delete", "/caches"): op(
        "Delete every cache of the caller's builds without a namespace (build:delete)",
        {"204": {"description": "Deleted"}, **NOT_FOUND},
        security=BEARER,
        extension=True,
    ),
    ("get", "/caches/{key}"): op(
        "A cache of the caller's builds without a namespace (build:read)",
        {"200": json_response("OK", ref("Cache")), **NOT_FOUND},
        security=BEARER,
        extension=True,
        parameters=CACHE_KEY,
    ),
    ("delete", "/caches/{key}"): op(
        "Delete a cache of the caller's builds without a namespace (build:delete)",
        {"204": {"description": "Deleted"}, **NOT_FOUND},
        security=BEARER,
        extension=True,
        parameters=CACHE_KEY,
    ),
    ("get", "/n/{username}/{path}/-/caches"): op(
        "Caches of the namespace (build:read; waived when public)",
        {"200": json_response("OK", list_of("Cache")), **NOT_FOUND},
        security=OPTIONAL,
        extension=True,
        parameters=NS_PARAMS + PAGE,
    ),
    ("delete", "/n/{username}/{path}/-/caches"): op(
        "Delete every cache of the namespace (build:delete; owner or collaborator)",
        {"204": {"description": "Deleted"}, **NOT_FOUND},
        security=BEARER,
        extension=True,
        parameters=NS_PARAMS,
    ),
    ("get", "/n/{username}/{path}/-/caches/{key}"): op(
        "A cache of the namespace (build:read; waived when public)",
        {"200": json_response("OK", ref("Cache")), **NOT_FOUND},
        security=OPTIONAL,
        extension=True,
        parameters=NS_PARAMS + CACHE_KEY,
    ),
    ("delete", "/n/{username}/{path}/-/caches/{key}"): op(
        "Delete a cache of the namespace (build:delete; owner or collaborator)",
        {"204": {"description": "Deleted"}, **NOT_FOUND},
        security=BEARER,
        extension=True,
        parameters=NS_PARAMS + CACHE_KEY,
    ),
}
