"""Variables (docs/api.md §15) and a namespace's variables (§8.8)."""

from __future__ import annotations

from aiohttp import web

from marid import variables
from marid.api.auth import Caller, optional, requires
from marid.api.http import api_url, read_body
from marid.api.keys import CIPHER, POOL
from marid.api.namespaces import NS, NS_PARAMS
from marid.api.openapi import (
    BEARER,
    BOOL,
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
from marid.api.resources import announce, list_in_namespace, list_mine, readable, usable
from marid.users import User
from marid.variables import VariableForm

routes = web.RouteTableDef()


@routes.get("/variables")
@requires("variable:read")
async def list_variables(request: web.Request, user: User) -> web.Response:
    return await list_mine(request, user, variables.count, variables.page, variables.to_json)


@routes.post("/variables")
@requires("variable:write")
async def create_variable(request: web.Request, user: User) -> web.Response:
    form = VariableForm.parse(await read_body(request))
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        variable = await variables.create(conn, request.config_dict[CIPHER], user, form)
        [created] = await variables.to_json(conn, [variable], api_url(request))
        await announce(conn, request, "variables", "created", variable, variables.to_json, created)
    return web.json_response(created, status=201)


@routes.get(r"/variables/{id:\d+}")
@optional
async def show_variable(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        variable = await readable(conn, request, caller, variables.get, "variable:read")
        [shown] = await variables.to_json(conn, [variable], api_url(request))
    return web.json_response(shown)


@routes.delete(r"/variables/{id:\d+}")
@requires("variable:delete")
async def delete_variable(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        variable = await usable(conn, request, user, variables.get)
        await announce(conn, request, "variables", "deleted", variable, variables.to_json)
        await variables.delete(conn, variable)
    return web.Response(status=204)


@routes.get(NS + "/-/variables")
@optional
async def list_namespace_variables(request: web.Request, caller: Caller) -> web.Response:
    return await list_in_namespace(
        request, caller, variables.count, variables.page, variables.to_json
    )


SCHEMAS = {
    "Variable": obj(
        {
            "id": INT,
            "author_id": INT,
            "user_id": INT,
            "namespace_id": nullable(INT),
            "key": STRING,
            "value": {**STRING, "description": "`xxxxxx` when masked"},
            "masked": BOOL,
            "created_at": TIME,
            "url": URL,
            "author": ref("User"),
            "user": ref("User"),
            "namespace": nullable(ref("Namespace")),
        }
    ),
    "VariableRequest": obj(
        {"namespace": STRING, "key": STRING, "value": STRING, "mask": BOOL},
        optional=("namespace", "mask"),
    ),
}
ID = [path_param("id", "variable id")]
OPERATIONS: Operations = {
    ("get", "/variables"): op(
        "The caller's variables and those of their namespaces (variable:read)",
        {"200": json_response("OK", list_of("Variable")), **NOT_FOUND},
        security=BEARER,
        parameters=search_params(),
    ),
    ("post", "/variables"): op(
        "Create a variable (variable:write)",
        {"201": json_response("Created", ref("Variable")), **INVALID, **NOT_FOUND},
        security=BEARER,
        body=ref("VariableRequest"),
    ),
    ("get", "/variables/{id}"): op(
        "A variable (variable:read; waived when public)",
        {"200": json_response("OK", ref("Variable")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=ID,
    ),
    ("delete", "/variables/{id}"): op(
        "Delete a variable (variable:delete; owner or collaborator)",
        {"204": {"description": "Deleted"}, **NOT_FOUND},
        security=BEARER,
        parameters=ID,
    ),
    ("get", "/n/{username}/{path}/-/variables"): op(
        "Variables of the namespace (namespace:read; waived when public)",
        {"200": json_response("OK", list_of("Variable")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=NS_PARAMS + search_params(),
    ),
}
