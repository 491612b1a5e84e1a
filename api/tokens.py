"""Personal access tokens (EXTENSIONS.md b)."""

from __future__ import annotations

from aiohttp import web

from api.auth import Caller, basic_or_bearer
from api.http import api_url, path_id, read_body
from api.keys import POOL
from marid import tokens
from marid.validation import NotFound

routes = web.RouteTableDef()


@routes.get("/tokens")
@basic_or_bearer("token:read")
async def list_tokens(request: web.Request, caller: Caller) -> web.Response:
    assert caller.user is not None
    async with request.config_dict[POOL].acquire() as conn:
        found = await tokens.list_for(conn, caller.user)
    base = api_url(request)
    return web.json_response([tokens.to_json(token, base) for token in found])


@routes.post("/tokens")
@basic_or_bearer("token:write")
async def create_token(request: web.Request, caller: Caller) -> web.Response:
    assert caller.user is not None
    body = await read_body(request)
    scope = tokens.check_new_token(
        body.data.get("name"), body.data.get("scope"), body.errors, limit=caller.scope
    )
    body.errors.raise_if_any()
    assert scope is not None
    async with request.config_dict[POOL].acquire() as conn:
        token, value = await tokens.create(conn, caller.user, body.data["name"], scope)
    return web.json_response(
        {**tokens.to_json(token, api_url(request)), "token": value}, status=201
    )


@routes.delete(r"/tokens/{id:\d+}")
@basic_or_bearer("token:delete")
async def delete_token(request: web.Request, caller: Caller) -> web.Response:
    assert caller.user is not None
    async with request.config_dict[POOL].acquire() as conn:
        if not await tokens.delete(conn, caller.user, path_id(request)):
            raise NotFound()
    return web.Response(status=204)
