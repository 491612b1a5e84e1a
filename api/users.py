"""The authenticated user (API.md §6)."""

from __future__ import annotations

from aiohttp import web

from api.auth import requires
from marid import users
from marid.users import User

routes = web.RouteTableDef()


@routes.get("/user")
@requires()
async def show_user(request: web.Request, user: User) -> web.Response:
    return web.json_response(users.to_json(user))
