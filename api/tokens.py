"""Personal access tokens (docs/api.md §18)."""

from __future__ import annotations

from aiohttp import web

from marid import tokens
from marid.api.auth import Caller, basic_or_bearer
from marid.api.http import api_url, path_id, read_body
from marid.api.keys import POOL
from marid.api.openapi import (
    BASIC_OR_BEARER,
    INT,
    INVALID,
    NOT_FOUND,
    STRING,
    TIME,
    UNAUTHORIZED,
    URL,
    Operations,
    json_response,
    nullable,
    obj,
    op,
    path_param,
    ref,
)
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
        token, value = await tokens.create(
            conn, caller.user, body.data["name"], scope, minted_with=caller.token_id
        )
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


SCHEMAS = {
    "Token": obj(
        {
            "id": INT,
            "name": STRING,
            "scope": STRING,
            "app": nullable(obj({"client_id": STRING, "name": STRING})),
            "created_at": TIME,
            "last_used_at": nullable(TIME),
            "url": URL,
            "token": {**STRING, "description": "only in the POST /tokens response"},
        },
        optional=("token",),
    ),
    "TokenRequest": obj({"name": STRING, "scope": STRING}, optional=("scope",)),
}

OPERATIONS: Operations = {
    ("get", "/tokens"): op(
        "List the caller's tokens (token:read)",
        {"200": json_response("OK", {"type": "array", "items": ref("Token")}), **UNAUTHORIZED},
        security=BASIC_OR_BEARER,
        extension=True,
    ),
    ("post", "/tokens"): op(
        "Create a personal access token (token:write); the value is shown once",
        {"201": json_response("Created", ref("Token")), **INVALID, **UNAUTHORIZED},
        security=BASIC_OR_BEARER,
        body=ref("TokenRequest"),
        extension=True,
    ),
    ("delete", "/tokens/{id}"): op(
        "Revoke a token (token:delete)",
        {"204": {"description": "Revoked"}, **UNAUTHORIZED, **NOT_FOUND},
        security=BASIC_OR_BEARER,
        extension=True,
        parameters=[path_param("id", "token id")],
    ),
}
