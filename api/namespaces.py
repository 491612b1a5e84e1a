"""Namespaces, their children, collaborators and badge (docs/api.md §8)."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from marid import builds, invites, namespaces, webhooks
from marid.api.auth import Caller, optional, requires
from marid.api.http import Page, api_url, query, read_body
from marid.api.keys import POOL
from marid.api.openapi import (
    BEARER,
    INVALID,
    NOT_FOUND,
    OPTIONAL,
    Operations,
    json_response,
    list_of,
    namespace_params,
    op,
    path_param,
    ref,
    search_params,
)
from marid.namespaces import Namespace, NamespaceForm
from marid.users import User
from marid.validation import NotFound

routes = web.RouteTableDef()

# A namespace path in a URL: 1 to 20 segments; the segment `-` ends it (docs/api.md §1.1).
# Segments may be separated by `%2F` too, as OpenAPI clients encode a path parameter's slashes
# (issue 11 row 17): aiohttp matches with `%2F` still encoded and decodes the value.
NS = r"/n/{username}/{path:[A-Za-z0-9]+(?:(?:/|%2F)[A-Za-z0-9]+)*}"


async def load_namespace(conn: asyncpg.Connection, request: web.Request) -> Namespace:
    """The namespace named by the URL; NotFound when the user or path does not exist."""
    path = request.match_info["path"]
    if path.count("/") >= namespaces.MAX_DEPTH:
        raise NotFound()
    ns = await namespaces.get_by_path(conn, request.match_info["username"], path)
    if ns is None:
        raise NotFound()
    return ns


@routes.get("/namespaces")
@requires("namespace:read")
async def list_namespaces(request: web.Request, user: User) -> web.Response:
    search = query(request, "search") or ""
    async with request.config_dict[POOL].acquire() as conn:
        page = Page(request, await namespaces.count_mine(conn, user, search))
        found = await namespaces.list_mine(conn, user, search, page.offset, page.limit)
        return page.response(await many_json(conn, found, api_url(request)))


@routes.post("/namespaces")
@requires("namespace:write")
async def create_namespace(request: web.Request, user: User) -> web.Response:
    form = NamespaceForm.parse(await read_body(request))
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        ns = await namespaces.create(conn, user, form)
        body = await full_json(conn, ns, api_url(request))
        # A new namespace has no webhooks yet: its parent's hear of it (§10.6).
        await webhooks.emit(
            conn, ns.parent_id, "namespaces", {"action": "created", "namespace": body}
        )
    return web.json_response(body, status=201)


async def many_json(
    conn: asyncpg.Connection, found: list[Namespace], base: str
) -> list[dict[str, object]]:
    """Namespace entities for a listing: `parent` null, `build` the latest build."""
    latest = await builds.latest_by_namespace(conn, [ns.id for ns in found])
    return [
        namespaces.to_json(ns, base, build=_build_json(latest.get(ns.id), ns, base)) for ns in found
    ]


def _build_json(build: builds.Build | None, ns: Namespace, base: str) -> dict[str, Any] | None:
    # The embedded build's own namespace is null (docs/api.md §8.1).
    return builds.to_json(build, ns.owner, None, base) if build else None


async def full_json(conn: asyncpg.Connection, ns: Namespace, base: str) -> dict[str, object]:
    """A namespace with its parent and latest build embedded (docs/api.md §8.4)."""
    parent = await namespaces.get(conn, ns.parent_id) if ns.parent_id else None
    latest = await builds.latest_in(conn, ns.id)
    return namespaces.to_json(
        ns,
        base,
        parent=namespaces.to_json(parent, base) if parent else None,
        build=_build_json(latest, ns, base),
    )


@routes.get(NS)
@optional
async def show_namespace(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        ns = await load_namespace(conn, request)
        caller.check_read(await namespaces.rights(conn, caller.user, ns), "namespace:read")
        body = await full_json(conn, ns, api_url(request))
    return web.json_response(body)


@routes.patch(NS)
@requires("namespace:write")
async def update_namespace(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        ns = await load_namespace(conn, request)
        if not (await namespaces.rights(conn, user, ns)).admin:
            raise NotFound()
        form = await read_body(request)
        description = namespaces.check_description(form)
        visibility = namespaces.check_visibility(form)
        max_running = namespaces.check_max_running(form)
        form.errors.raise_if_any()
        ns = await namespaces.update(conn, ns, description, visibility, max_running)
        body = await full_json(conn, ns, api_url(request))
        await webhooks.emit(conn, ns.id, "namespaces", {"action": "updated", "namespace": body})
    return web.json_response(body)


@routes.delete(NS)
@requires("namespace:delete")
async def delete_namespace(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        ns = await load_namespace(conn, request)
        if not (await namespaces.rights(conn, user, ns)).admin:
            raise NotFound()
        # Queued before the delete takes the webhooks with it; deliveries outlive them.
        body = await full_json(conn, ns, api_url(request))
        await webhooks.emit(conn, ns.id, "namespaces", {"action": "deleted", "namespace": body})
        await namespaces.delete(conn, ns)
    return web.Response(status=204)


@routes.get(NS + "/-/namespaces")
@optional
async def list_children(request: web.Request, caller: Caller) -> web.Response:
    search = query(request, "search") or ""
    async with request.config_dict[POOL].acquire() as conn:
        ns = await load_namespace(conn, request)
        caller.check_read(await namespaces.rights(conn, caller.user, ns), "namespace:read")
        page = Page(request, await namespaces.count_children(conn, ns, search))
        found = await namespaces.list_children(conn, ns, search, page.offset, page.limit)
        return page.response(await many_json(conn, found, api_url(request)))


@routes.get(NS + "/-/collaborators")
@requires("namespace:read")
async def list_collaborators(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        ns = await load_namespace(conn, request)
        if not (await namespaces.rights(conn, user, ns)).admin:
            raise NotFound()
        found = await invites.collaborators(conn, ns)
    base = api_url(request)
    return web.json_response([invites.collaborator_json(c, ns, base) for c in found])


@routes.delete(NS + "/-/collaborators/{handle}")
@requires("namespace:delete")
async def delete_collaborator(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        ns = await load_namespace(conn, request)
        if not (await namespaces.rights(conn, user, ns)).admin:
            raise NotFound()
        await invites.remove_collaborator(conn, ns, request.match_info["handle"])
    return web.Response(status=204)


# Badge colours and texts by build status (docs/api.md §8.7).
BADGES = {
    None: ("unknown", "#6a7393"),
    "queued": ("queued", "#272b39"),
    "running": ("running", "#61a0ea"),
    "passed": ("passed", "#269326"),
    "passed_with_failures": ("passed", "#ff7400"),
    "failed": ("failed", "#c64242"),
    "killed": ("killed", "#c64242"),
    "timed_out": ("timed out", "#6a7393"),
}


def badge_svg(status: str | None) -> str:
    """A shields-style SVG: `marid` on the left, the status on the right."""
    text, colour = BADGES.get(status, BADGES[None])
    left, right = 42, 8 + 7 * len(text)
    width = left + right
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" role="img" '
        f'aria-label="marid: {text}"><title>marid: {text}</title>'
        f'<rect width="{left}" height="20" fill="#383e51"/>'
        f'<rect x="{left}" width="{right}" height="20" fill="{colour}"/>'
        '<g fill="#fff" text-anchor="middle" font-family="Verdana,DejaVu Sans,sans-serif" '
        'font-size="11">'
        f'<text x="{left / 2}" y="14">marid</text>'
        f'<text x="{left + right / 2}" y="14">{text}</text></g></svg>'
    )


@routes.get(NS + "/-/badge.svg")
async def show_badge(request: web.Request) -> web.Response:
    """Always 200: `unknown` unless the namespace is public and has a build."""
    status = None
    async with request.config_dict[POOL].acquire() as conn:
        path = request.match_info["path"]
        ns = await namespaces.get_by_path(conn, request.match_info["username"], path)
        if ns is not None and ns.visibility == "public":
            latest = await builds.latest_in(conn, ns.id)
            status = latest.status if latest else None
    return web.Response(
        body=badge_svg(status).encode(),
        content_type="image/svg+xml",
        headers={"Cache-Control": "no-cache"},
    )


NS_PARAMS = namespace_params()
OPERATIONS: Operations = {
    ("get", "/namespaces"): op(
        "Namespaces the caller owns or collaborates on (namespace:read)",
        {"200": json_response("OK", list_of("Namespace")), **NOT_FOUND},
        security=BEARER,
        parameters=search_params(),
    ),
    ("post", "/namespaces"): op(
        "Create a namespace (namespace:write)",
        {"201": json_response("Created", ref("Namespace")), **INVALID, **NOT_FOUND},
        security=BEARER,
        body=ref("NamespaceRequest"),
    ),
    ("get", "/n/{username}/{path}"): op(
        "A namespace (namespace:read; waived when public)",
        {"200": json_response("OK", ref("Namespace")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=NS_PARAMS,
    ),
    ("patch", "/n/{username}/{path}"): op(
        "Update description or visibility (namespace:write; owner only)",
        {"200": json_response("OK", ref("Namespace")), **INVALID, **NOT_FOUND},
        security=BEARER,
        parameters=NS_PARAMS,
        body=ref("NamespaceUpdate"),
    ),
    ("delete", "/n/{username}/{path}"): op(
        "Delete a namespace and its descendants (namespace:delete; owner only)",
        {"204": {"description": "Deleted"}, **NOT_FOUND},
        security=BEARER,
        parameters=NS_PARAMS,
    ),
    ("get", "/n/{username}/{path}/-/namespaces"): op(
        "Direct children (namespace:read; waived when public)",
        {"200": json_response("OK", list_of("Namespace")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=NS_PARAMS + search_params(),
    ),
    ("get", "/n/{username}/{path}/-/collaborators"): op(
        "Collaborators of the tree (namespace:read; owner only)",
        {"200": json_response("OK", list_of("Collaborator")), **NOT_FOUND},
        security=BEARER,
        parameters=NS_PARAMS,
    ),
    ("delete", "/n/{username}/{path}/-/collaborators/{handle}"): op(
        "Remove a collaborator (namespace:delete; owner only)",
        {
            "204": {"description": "Removed"},
            "400": json_response("No such collaborator", ref("Message")),
            **NOT_FOUND,
        },
        security=BEARER,
        parameters=[*NS_PARAMS, path_param("handle", "username or email")],
    ),
    ("get", "/n/{username}/{path}/-/badge.svg"): op(
        "Build status badge of the namespace's latest build",
        {
            "200": {
                "description": "SVG",
                "content": {"image/svg+xml": {"schema": {"type": "string"}}},
            }
        },
        security=[],
        parameters=NS_PARAMS,
    ),
}
