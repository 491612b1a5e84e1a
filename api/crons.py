"""Cron jobs (docs/api.md §11, docs/api.md §17) and the builds each submitted."""

from __future__ import annotations

from aiohttp import web

from marid import builds, crons
from marid.api.auth import Caller, optional, requires
from marid.api.builds import FILTERS, page_of_builds, viewer_of
from marid.api.http import api_url, read_body
from marid.api.keys import CONFIG, POOL
from marid.api.openapi import (
    BEARER,
    INT,
    INVALID,
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
    ref,
    search_params,
)
from marid.api.resources import announce, list_mine, readable, usable
from marid.crons import CronForm
from marid.manifest import ManifestLimits
from marid.users import User
from marid.validation import NotFound

routes = web.RouteTableDef()


@routes.get("/cron")
@requires("cron:read")
async def list_crons(request: web.Request, user: User) -> web.Response:
    return await list_mine(request, user, crons.count, crons.page, crons.to_json)


@routes.post("/cron")
@requires("cron:write")
async def create_cron(request: web.Request, user: User) -> web.Response:
    form = CronForm.parse(await read_body(request), creating=True)
    limits = ManifestLimits.from_config(request.config_dict[CONFIG])
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        cron = await crons.create(conn, user, form, limits, crons.now())
        [created] = await crons.to_json(conn, [cron], api_url(request))
        await announce(conn, request, "cron", "created", cron, crons.to_json, created)
    return web.json_response(created, status=201)


@routes.get(r"/cron/{id:\d+}")
@optional
async def show_cron(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        cron = await readable(conn, request, caller, crons.get, "cron:read")
        [shown] = await crons.to_json(conn, [cron], api_url(request))
    return web.json_response(shown)


@routes.get(r"/cron/{id:\d+}/builds")
@optional
async def list_cron_builds(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        cron = await readable(conn, request, caller, crons.get, "cron:read", "build:read")
        # Each build by its own rights (§7.2), not the cron job's: the cron job may have moved
        # to another namespace since (issue 11 row 3).
        listing = builds.Listing(cron_id=cron.id)
        return await page_of_builds(request, conn, listing, viewer_of(caller, may_read=False))


@routes.patch(r"/cron/{id:\d+}")
@requires("cron:write")
async def update_cron(request: web.Request, user: User) -> web.Response:
    limits = ManifestLimits.from_config(request.config_dict[CONFIG])
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        cron = await usable(conn, request, user, crons.get)
        if not crons.may_change(cron, user):
            raise NotFound()
        form = CronForm.parse(await read_body(request), creating=False)
        cron = await crons.update(conn, user, cron, form, limits, crons.now())
        [updated] = await crons.to_json(conn, [cron], api_url(request))
        await announce(conn, request, "cron", "updated", cron, crons.to_json, updated)
    return web.json_response(updated)


@routes.delete(r"/cron/{id:\d+}")
@requires("cron:delete")
async def delete_cron(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        cron = await usable(conn, request, user, crons.get)
        if not crons.may_delete(cron, user):
            raise NotFound()
        await announce(conn, request, "cron", "deleted", cron, crons.to_json)
        await crons.delete(conn, cron)
    return web.Response(status=204)


SCHEMAS = {
    "Cron": obj(
        {
            "id": INT,
            "author_id": INT,
            "user_id": INT,
            "namespace_id": nullable(INT),
            "name": STRING,
            "schedule": STRING,
            "manifest": STRING,
            "prev_run": nullable(TIME),
            "next_run": TIME,
            "created_at": TIME,
            "url": URL,
            "author": ref("User"),
            "user": ref("User"),
            "namespace": nullable(ref("Namespace")),
            "timezone": STRING,
        }
    ),
    "CronRequest": obj(
        {"name": STRING, "schedule": STRING, "manifest": STRING, "timezone": STRING},
        optional=("name", "schedule", "manifest", "timezone"),
    ),
    "CronCreateRequest": obj(
        {"name": STRING, "schedule": STRING, "manifest": STRING, "timezone": STRING},
        optional=("schedule", "timezone"),
    ),
}
ID = [path_param("id", "cron job id")]
OPERATIONS: Operations = {
    ("get", "/cron"): op(
        "The caller's cron jobs and those of their namespaces (cron:read)",
        {"200": json_response("OK", list_of("Cron")), **NOT_FOUND},
        security=BEARER,
        parameters=search_params(),
    ),
    ("post", "/cron"): op(
        "Create a cron job (cron:write); name and manifest are required",
        {"201": json_response("Created", ref("Cron")), **INVALID, **NOT_FOUND},
        security=BEARER,
        body=ref("CronCreateRequest"),
    ),
    ("get", "/cron/{id}"): op(
        "A cron job (cron:read; waived when public)",
        {"200": json_response("OK", ref("Cron")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=ID,
    ),
    ("get", "/cron/{id}/builds"): op(
        "Builds submitted by the cron job (cron:read, build:read; waived when public)",
        {"200": json_response("OK", list_of("Build")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=[*ID, *FILTERS],
    ),
    ("patch", "/cron/{id}"): op(
        "Change a cron job (cron:write; its author); a field left out, or an empty manifest,"
        " keeps its value",
        {"200": json_response("OK", ref("Cron")), **INVALID, **NOT_FOUND},
        security=BEARER,
        body=ref("CronRequest"),
        parameters=ID,
    ),
    ("delete", "/cron/{id}"): op(
        "Delete a cron job; its builds are kept (cron:delete; owner or collaborator)",
        {"204": {"description": "Deleted"}, **NOT_FOUND},
        security=BEARER,
        parameters=ID,
    ),
}
