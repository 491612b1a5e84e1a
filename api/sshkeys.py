"""SSH keys (docs/api.md §13) and a namespace's keys (§8.8). Named sshkeys so it does not clash with
api/keys.py (the application's typed keys). No endpoint ever returns a private key."""

from __future__ import annotations

import asyncio

from aiohttp import web

from marid import keys
from marid.api.auth import Caller, optional, requires
from marid.api.http import api_url, read_body
from marid.api.keys import CIPHER, POOL
from marid.api.namespaces import NS, NS_PARAMS
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
from marid.api.resources import announce, list_in_namespace, list_mine, readable, usable
from marid.keys import KeyForm
from marid.users import User

routes = web.RouteTableDef()


@routes.get("/keys")
@requires("key:read")
async def list_keys(request: web.Request, user: User) -> web.Response:
    return await list_mine(request, user, keys.count, keys.page, keys.to_json)


@routes.post("/keys")
@requires("key:write")
async def create_key(request: web.Request, user: User) -> web.Response:
    body = await read_body(request)
    # Parsing a private key (RSA especially) takes long enough to stall the event loop.
    form = await asyncio.to_thread(KeyForm.parse, body)
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        key = await keys.create(conn, request.config_dict[CIPHER], user, form)
        [created] = await keys.to_json(conn, [key], api_url(request))
        await announce(conn, request, "ssh_keys", "created", key, keys.to_json, created)
    return web.json_response(created, status=201)


@routes.get(r"/keys/{id:\d+}")
@optional
async def show_key(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        key = await readable(conn, request, caller, keys.get, "key:read")
        [shown] = await keys.to_json(conn, [key], api_url(request))
    return web.json_response(shown)


@routes.patch(r"/keys/{id:\d+}")
@requires("key:write")
async def update_key(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        key = await usable(conn, request, user, keys.get)
        body = await read_body(request)  # only `config`: name, namespace and key are ignored
        config = keys.check_config(body)
        body.errors.raise_if_any()
        key = await keys.update_config(conn, key, config)
        [updated] = await keys.to_json(conn, [key], api_url(request))
        await announce(conn, request, "ssh_keys", "updated", key, keys.to_json, updated)
    return web.json_response(updated)


@routes.delete(r"/keys/{id:\d+}")
@requires("key:delete")
async def delete_key(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        key = await usable(conn, request, user, keys.get)
        await announce(conn, request, "ssh_keys", "deleted", key, keys.to_json)
        await keys.delete(conn, key)
    return web.Response(status=204)


@routes.get(NS + "/-/keys")
@optional
async def list_namespace_keys(request: web.Request, caller: Caller) -> web.Response:
    return await list_in_namespace(request, caller, keys.count, keys.page, keys.to_json)


SCHEMAS = {
    "Key": obj(
        {
            "id": INT,
            "author_id": INT,
            "user_id": INT,
            "namespace_id": nullable(INT),
            "name": STRING,
            "config": STRING,
            "created_at": TIME,
            "updated_at": TIME,
            "url": URL,
            "author": ref("User"),
            "user": ref("User"),
            "namespace": nullable(ref("Namespace")),
        }
    ),
    "KeyRequest": obj(
        {
            "namespace": STRING,
            "name": STRING,
            "key": {**STRING, "description": "unencrypted PEM or OpenSSH private key"},
            "config": STRING,
        },
        optional=("namespace", "config"),
    ),
    "KeyUpdate": obj({"config": STRING}, optional=("config",)),
}
ID = [path_param("id", "key id")]
OPERATIONS: Operations = {
    ("get", "/keys"): op(
        "The caller's SSH keys and those of their namespaces (key:read)",
        {"200": json_response("OK", list_of("Key")), **NOT_FOUND},
        security=BEARER,
        parameters=search_params(),
    ),
    ("post", "/keys"): op(
        "Add an SSH private key (key:write)",
        {"201": json_response("Created", ref("Key")), **INVALID, **NOT_FOUND},
        security=BEARER,
        body=ref("KeyRequest"),
    ),
    ("get", "/keys/{id}"): op(
        "An SSH key, without its private key (key:read; waived when public)",
        {"200": json_response("OK", ref("Key")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=ID,
    ),
    ("patch", "/keys/{id}"): op(
        "Update a key's SSH config (key:write; owner or collaborator)",
        {"200": json_response("OK", ref("Key")), **INVALID, **NOT_FOUND},
        security=BEARER,
        parameters=ID,
        body=ref("KeyUpdate"),
    ),
    ("delete", "/keys/{id}"): op(
        "Delete an SSH key (key:delete; owner or collaborator)",
        {"204": {"description": "Deleted"}, **NOT_FOUND},
        security=BEARER,
        parameters=ID,
    ),
    ("get", "/n/{username}/{path}/-/keys"): op(
        "SSH keys of the namespace (namespace:read; waived when public)",
        {"200": json_response("OK", list_of("Key")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=NS_PARAMS + search_params(),
    ),
}
