"""Variables (API.md §15) and a namespace's variables (§8.8)."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from api.auth import Caller, optional, requires
from api.http import Page, api_url, path_id, query, read_body
from api.keys import CIPHER, POOL
from api.namespaces import NS, NS_PARAMS, load_namespace
from api.openapi import (
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
from marid import namespaces, variables
from marid.namespaces import Rights
from marid.users import User
from marid.validation import NotFound
from marid.variables import Variable, VariableForm

routes = web.RouteTableDef()


def matches_nothing(search: str) -> bool:
    """PostgreSQL text cannot hold NUL (`?search=%00`), so no stored key contains one."""
    return "\x00" in search


@routes.get("/variables")
@requires("variable:read")
async def list_variables(request: web.Request, user: User) -> web.Response:
    search = query(request, "search") or ""
    if matches_nothing(search):
        return Page(request, 0).response([])
    async with request.config_dict[POOL].acquire() as conn:
        page = Page(request, await variables.count_mine(conn, user, search))
        found = await variables.list_mine(conn, user, search, page.offset, page.limit)
        return page.response(await variables.to_json(conn, found, api_url(request)))


@routes.post("/variables")
@requires("variable:write")
async def create_variable(request: web.Request, user: User) -> web.Response:
    form = VariableForm.parse(await read_body(request))
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        variable = await variables.create(conn, request.config_dict[CIPHER], user, form)
        [created] = await variables.to_json(conn, [variable], api_url(request))
    return web.json_response(created, status=201)


async def load_variable(
    conn: asyncpg.Connection, request: web.Request, user: User | None
) -> tuple[Variable, Rights]:
    """The variable named by the URL with the caller's rights on it; NotFound if missing."""
    variable = await variables.get(conn, path_id(request))
    if variable is None:
        raise NotFound()
    ns = await namespaces.get(conn, variable.namespace_id) if variable.namespace_id else None
    return variable, await namespaces.resource_rights(conn, user, variable.user_id, ns)


@routes.get(r"/variables/{id:\d+}")
@optional
async def show_variable(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        variable, rights = await load_variable(conn, request, caller.user)
        caller.check_read(rights, "variable:read")
        [shown] = await variables.to_json(conn, [variable], api_url(request))
    return web.json_response(shown)


@routes.delete(r"/variables/{id:\d+}")
@requires("variable:delete")
async def delete_variable(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        variable, rights = await load_variable(conn, request, user)
        if not rights.use:
            raise NotFound()
        await variables.delete(conn, variable)
    return web.Response(status=204)


@routes.get(NS + "/-/variables")
@optional
async def list_namespace_variables(request: web.Request, caller: Caller) -> web.Response:
    search = query(request, "search") or ""
    async with request.config_dict[POOL].acquire() as conn:
        ns = await load_namespace(conn, request)
        caller.check_read(await namespaces.rights(conn, caller.user, ns), "namespace:read")
        if matches_nothing(search):
            return Page(request, 0).response([])
        page = Page(request, await variables.count_in(conn, ns, search))
        found = await variables.list_in(conn, ns, search, page.offset, page.limit)
        return page.response(await variables.to_json(conn, found, api_url(request)))


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
