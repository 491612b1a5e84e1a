"""OAuth application registration (docs/api.md §23)."""

from __future__ import annotations

from aiohttp import web

from marid import apps
from marid.api.auth import Caller, basic_or_bearer
from marid.api.http import api_url, read_body
from marid.api.keys import POOL
from marid.api.openapi import (
    BASIC_OR_BEARER,
    INVALID,
    NOT_FOUND,
    STRING,
    TIME,
    UNAUTHORIZED,
    URL,
    Operations,
    json_response,
    obj,
    op,
    path_param,
    ref,
)
from marid.validation import NotFound

routes = web.RouteTableDef()


@routes.get("/apps")
@basic_or_bearer("app:read")
async def list_apps(request: web.Request, caller: Caller) -> web.Response:
    assert caller.user is not None
    async with request.config_dict[POOL].acquire() as conn:
        found = await apps.list_for(conn, caller.user)
    base = api_url(request)
    return web.json_response([apps.to_json(app, base) for app in found])


@routes.post("/apps")
@basic_or_bearer("app:write")
async def create_app(request: web.Request, caller: Caller) -> web.Response:
    assert caller.user is not None
    form = apps.AppForm.parse(await read_body(request))
    async with request.config_dict[POOL].acquire() as conn:
        app, secret = await apps.create(conn, caller.user, form)
    return web.json_response(
        {**apps.to_json(app, api_url(request)), "client_secret": secret}, status=201
    )


@routes.delete("/apps/{client_id}")
@basic_or_bearer("app:delete")
async def delete_app(request: web.Request, caller: Caller) -> web.Response:
    assert caller.user is not None
    async with request.config_dict[POOL].acquire() as conn:
        if not await apps.delete(conn, caller.user, request.match_info["client_id"]):
            raise NotFound()
    return web.Response(status=204)


SCHEMAS = {
    "App": obj(
        {
            "client_id": STRING,
            "name": STRING,
            "description": STRING,
            "homepage_uri": URL,
            "redirect_uri": URL,
            "created_at": TIME,
            "url": URL,
            "client_secret": {**STRING, "description": "only in the POST /apps response"},
        },
        optional=("client_secret",),
    ),
    "AppRequest": obj(
        {"name": STRING, "description": STRING, "homepage_uri": URL, "redirect_uri": URL},
        optional=("description",),
    ),
}

OPERATIONS: Operations = {
    ("get", "/apps"): op(
        "List the caller's OAuth applications (app:read)",
        {"200": json_response("OK", {"type": "array", "items": ref("App")}), **UNAUTHORIZED},
        security=BASIC_OR_BEARER,
        extension=True,
    ),
    ("post", "/apps"): op(
        "Register an OAuth application (app:write); the client secret is shown once",
        {"201": json_response("Created", ref("App")), **INVALID, **UNAUTHORIZED},
        security=BASIC_OR_BEARER,
        body=ref("AppRequest"),
        extension=True,
    ),
    ("delete", "/apps/{client_id}"): op(
        "Delete an application with its pending codes and tokens (app:delete)",
        {"204": {"description": "Deleted"}, **UNAUTHORIZED, **NOT_FOUND},
        security=BASIC_OR_BEARER,
        extension=True,
        parameters=[path_param("client_id", "the application's client id")],
    ),
}
