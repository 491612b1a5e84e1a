"""The authenticated user (docs/api.md §6)."""

from __future__ import annotations

from aiohttp import web

from marid import users
from marid.api.auth import requires
from marid.api.openapi import BEARER, NOT_FOUND, Operations, json_response, op, ref
from marid.users import User

routes = web.RouteTableDef()


@routes.get("/user")
@requires()
async def show_user(request: web.Request, user: User) -> web.Response:
    return web.json_response(users.to_json(user))


OPERATIONS: Operations = {
    ("get", "/user"): op(
        "The token's user", {"200": json_response("OK", ref("User")), **NOT_FOUND}, security=BEARER
    ),
}
