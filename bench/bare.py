"""The baseline server of bench/user.py: one aiohttp handler doing one indexed SELECT.

It shares only what makes the comparison fair with marid: the same asyncpg pool settings
(`marid.db.create_pool`), the same path and the same JSON body. No middlewares, no token,
no access log. Run by bench/user.py as its own process; stops on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from marid.db import create_pool
from marid.times import rfc3339

POOL = web.AppKey("pool", asyncpg.Pool)
USER_ID = web.AppKey("user_id", int)
PATH = "/api/user"
SELECT_USER = "SELECT username, email, created_at FROM users WHERE id = $1"  # primary key


async def show_user(request: web.Request) -> web.Response:
    async with request.app[POOL].acquire() as conn:
        row = await conn.fetchrow(SELECT_USER, request.app[USER_ID])
    if row is None:
        raise web.HTTPNotFound()
    created_at = rfc3339(row["created_at"])
    return web.json_response(
        {"email": row["email"], "username": row["username"], "created_at": created_at}
    )


def create_app(dsn: str, pool_size: int, user_id: int) -> web.Application:
    """The bare application; it opens its pool on startup and closes it on cleanup."""

    async def pool_context(app: web.Application) -> AsyncIterator[None]:
        app[POOL] = await create_pool(dsn, pool_size)
        yield
        await app[POOL].close()

    app = web.Application()
    app[USER_ID] = user_id
    app.cleanup_ctx.append(pool_context)
    app.router.add_get(PATH, show_user)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--port", type=int, required=True, help="on 127.0.0.1")
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--user-id", type=int, required=True)
    args = parser.parse_args()
    app = create_app(args.dsn, args.pool_size, args.user_id)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
