"""Runners and runner tokens, for administrators (docs/api.md §28, issue 15).

Every endpoint needs a bearer token holding its `runner` scope whose user is listed in
`server.admins`; anyone else gets 404, as for any token endpoint (§1.6).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

from aiohttp import web

from marid import remote
from marid.api.auth import Handler, TokenHandler, requires
from marid.api.http import api_url, path_id, read_body
from marid.api.keys import BLOBS, CONFIG, POOL
from marid.api.openapi import (
    BEARER,
    BOOL,
    INT,
    INVALID,
    NOT_FOUND,
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
)
from marid.users import User
from marid.validation import NotFound

routes = web.RouteTableDef()
ENROLMENT_FIELDS = ("name", "expires_in")


def administrator(*needed: str) -> Callable[[TokenHandler], Handler]:
    """`requires(*needed)`, and the token's user must be one of `server.admins`; else 404."""

    def decorate(handler: TokenHandler) -> Handler:
        @functools.wraps(handler)
        async def admin_only(request: web.Request, user: User) -> web.StreamResponse:
            if not request.config_dict[CONFIG].is_admin(user.username):
                raise NotFound()
            return await handler(request, user)

        return requires(*needed)(admin_only)

    return decorate


@routes.get("/runners")
@administrator("runner:read")
async def list_runners(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        found = await remote.list_runners(conn)
    base = api_url(request)
    return web.json_response([remote.runner_json(runner, base) for runner in found])


@routes.delete(r"/runners/{id:\d+}")
@administrator("runner:delete")
async def delete_runner(request: web.Request, user: User) -> web.Response:
    """Revoke a registered runner: its token stops working and the builds it holds are handed
    back; those that ended for it (their last attempt, or a kill asked for) send
    build.finished."""
    config = request.config_dict[CONFIG]
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        handed = await remote.revoke(
            conn, path_id(request), config.runner.max_attempts, api_url(request)
        )
    if handed is None:
        raise NotFound()
    for key in handed.stale_blobs:
        with contextlib.suppress(Exception):  # else the reaper removes it later
            await request.config_dict[BLOBS].delete(key)
    return web.Response(status=204)


@routes.get("/runner-tokens")
@administrator("runner:read")
async def list_runner_tokens(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        found = await remote.list_enrolments(conn)
    base = api_url(request)
    return web.json_response([remote.enrolment_json(enrolment, base) for enrolment in found])


@routes.post("/runner-tokens")
@administrator("runner:write")
async def create_runner_token(request: web.Request, user: User) -> web.Response:
    """A new enrolment token; its value is in this answer only."""
    body = await read_body(request)
    for unknown in sorted(set(body.data) - set(ENROLMENT_FIELDS)):
        body.errors.add(unknown, "Unknown field")
    name, expires_in = body.data.get("name"), body.data.get("expires_in")
    remote.check_enrolment(name, expires_in, body.errors)
    body.errors.raise_if_any()
    assert isinstance(name, str)
    async with request.config_dict[POOL].acquire() as conn:
        enrolment, value = await remote.create_enrolment(conn, name, user.id, expires_in)
    return web.json_response(
        {**remote.enrolment_json(enrolment, api_url(request)), "token": value}, status=201
    )


@routes.delete(r"/runner-tokens/{id:\d+}")
@administrator("runner:delete")
async def delete_runner_token(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        if not await remote.delete_enrolment(conn, path_id(request)):
            raise NotFound()
    return web.Response(status=204)


SCHEMAS = {
    "Runner": obj(
        {
            "id": INT,
            "name": STRING,
            "remote": {**BOOL, "description": "registered over HTTP (marid runner --server)"},
            "version": STRING,
            "hostname": STRING,
            "drivers": {"type": "array", "items": STRING},
            "labels": {"type": "array", "items": STRING},
            "capacity": INT,
            "running": INT,
            "started_at": TIME,
            "last_seen_at": TIME,
            "alive": BOOL,
            "revoked_at": nullable(TIME),
            "address": nullable(STRING),
            "url": URL,
        }
    ),
    "RunnerToken": obj(
        {
            "id": INT,
            "name": STRING,
            "created_by": nullable(STRING),
            "created_at": TIME,
            "expires_at": nullable(TIME),
            "last_used_at": nullable(TIME),
            "url": URL,
            "token": {**STRING, "description": "only in the POST /runner-tokens response"},
        },
        optional=("token",),
    ),
    "RunnerTokenRequest": {
        **obj(
            {
                "name": {**STRING, "minLength": 1, "maxLength": 255},
                "expires_in": nullable(
                    {"type": "number", "exclusiveMinimum": 0, "maximum": 10 * 365 * 86400}
                ),
            },
            optional=("expires_in",),
        ),
        "additionalProperties": False,
    },
}

ADMIN_ONLY = "; administrators (server.admins) only"
OPERATIONS: Operations = {
    ("get", "/runners"): op(
        f"List every runner, in-process and registered (runner:read{ADMIN_ONLY})",
        {"200": json_response("OK", list_of("Runner")), **NOT_FOUND},
        security=BEARER,
        extension=True,
    ),
    ("delete", "/runners/{id}"): op(
        f"Revoke a registered runner and hand its builds back (runner:delete{ADMIN_ONLY})",
        {"204": {"description": "Revoked"}, **NOT_FOUND},
        security=BEARER,
        extension=True,
        parameters=[path_param("id", "runner id")],
    ),
    ("get", "/runner-tokens"): op(
        f"List the runner enrolment tokens (runner:read{ADMIN_ONLY})",
        {"200": json_response("OK", list_of("RunnerToken")), **NOT_FOUND},
        security=BEARER,
        extension=True,
    ),
    ("post", "/runner-tokens"): op(
        f"Create a runner enrolment token; the value is shown once (runner:write{ADMIN_ONLY})",
        {"201": json_response("Created", ref("RunnerToken")), **INVALID, **NOT_FOUND},
        security=BEARER,
        body=ref("RunnerTokenRequest"),
        extension=True,
    ),
    ("delete", "/runner-tokens/{id}"): op(
        f"Revoke a runner enrolment token (runner:delete{ADMIN_ONLY})",
        {"204": {"description": "Revoked"}, **NOT_FOUND},
        security=BEARER,
        extension=True,
        parameters=[path_param("id", "runner token id")],
    ),
}
