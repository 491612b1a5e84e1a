"""The aiohttp application: middlewares, routes and the database pool's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
from aiohttp import web

from marid.api import downloads, errors, http, ratelimit
from marid.api import web as web_interface
from marid.api.app_modules import MODULES, ROOT_MODULES
from marid.api.keys import (
    API_MODULES,
    API_PREFIX,
    BLOBS,
    CIPHER,
    CONFIG,
    HTTP_METRICS,
    POOL,
    RATE_LIMITER,
    ROOT_MODULES_KEY,
)
from marid.api.live import LIVE, live_context
from marid.api.web import pages as web_pages
from marid.blobs import open_store
from marid.config import Config
from marid.crypto import Cipher
from marid.db import ABSENT, create_pool, reason
from marid.metrics import Http
from marid.ratelimit import Limiter


def create_app(config: Config, pool: asyncpg.Pool | None = None) -> web.Application:
    """The server root application; API routes live under the path of `server.api_url`.

    Without `pool` the app opens (and closes) its own from `database.dsn`.
    """
    prefix = urlsplit(config.server.api_url).path.rstrip("/")
    # The web interface lives at the server root, so it needs the API under a path of its own
    # (the default /api); with the API at the root there are no pages (docs/web.md §1).
    pages = bool(prefix)
    app = web.Application(
        middlewares=[
            errors.request_log,
            errors.errors,
            *([web_pages.html_errors] if pages else []),
            http.body_timeout,
            ratelimit.rate_limit,
        ],
        client_max_size=http.MAX_JSON_BODY,
    )
    app[CONFIG] = config
    app[API_MODULES] = MODULES
    app[ROOT_MODULES_KEY] = ROOT_MODULES
    app[CIPHER] = Cipher(config.crypto.key)
    app[HTTP_METRICS] = Http()
    # Contexts start in this order and stop in reverse: image downloads need the pool and the
    # blob store, so they stop first.
    if pool is None:
        app.cleanup_ctx.append(_pool_context)
    else:
        app[POOL] = pool
    app.cleanup_ctx.append(_blob_store_context)
    app.cleanup_ctx.append(_live_context)
    app.on_shutdown.append(_drain)
    app.cleanup_ctx.append(downloads.context)
    if config.rate_limit.enabled:
        app[RATE_LIMITER] = Limiter(config.rate_limit, prefix)
        app.on_response_prepare.append(ratelimit.add_headers)
    api = web.Application(client_max_size=http.MAX_JSON_BODY) if prefix else app
    api[API_PREFIX] = prefix
    for module in MODULES:
        api.add_routes(module.routes)
    for module in ROOT_MODULES:
        app.add_routes(module.routes)
    if prefix:
        app.router.add_get(prefix, MODULES[0].show_root)  # the API root without its trailing slash
        app.add_subapp(prefix, api)
    if pages:
        web_interface.setup(app)
    return app


async def _pool_context(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    # Connecting on first use: `marid serve` starts while the database is away and answers
    # 503 until it is back (docs/configuration.md §2.3).
    app[POOL] = await create_pool(config.database.dsn, config.database.pool_size, connect=False)
    yield
    await app[POOL].close()


async def _live_context(app: web.Application) -> AsyncIterator[None]:
    """api/live.py's `live_context`, except that a database away at start-up does not fail the
    start: the watch notes the outage and reconnects in the background (docs/api.md §1.4)."""
    watch = live_context(app)
    try:
        await anext(watch)
    except ABSENT as exc:
        app[LIVE].database_away(f"at start-up: {reason(exc)}")
        yield
        await app[LIVE].stop()
        return
    yield
    await anext(watch, None)


async def _drain(app: web.Application) -> None:
    if LIVE in app:
        app[LIVE].drain()


async def _blob_store_context(app: web.Application) -> AsyncIterator[None]:
    app[BLOBS] = open_store(app[CONFIG].storage)
    yield
    await app[BLOBS].close()
