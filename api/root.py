"""The API root (API.md §5), health and the OpenAPI document (EXTENSIONS.md f)."""

from __future__ import annotations

import asyncio
from types import ModuleType

import asyncpg
from aiohttp import web

from api import openapi
from api.http import api_url
from api.keys import API_MODULES, CONFIG, POOL, ROOT_MODULES_KEY
from api.openapi import Operations, json_response, op, ref
from marid import __version__

routes = web.RouteTableDef()
HEALTH_TIMEOUT = 2.0
COLLECTIONS = ("builds", "namespaces", "cron", "invites", "images", "objects", "variables", "keys")


@routes.get("/")
async def show_root(request: web.Request) -> web.Response:
    base = api_url(request)
    return web.json_response({f"{name}_url": f"{base}/{name}" for name in COLLECTIONS})


@routes.get("/health")
async def show_health(request: web.Request) -> web.Response:
    """200 when `SELECT 1` answers within 2 s, else 503."""
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            async with request.config_dict[POOL].acquire() as conn:
                await conn.fetchval("SELECT 1")
        status, state = 200, "ok"
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        status, state = 503, "unavailable"
    body = {"status": state, "database": state, "version": __version__}
    return web.json_response(body, status=status)


@routes.get("/openapi.json")
async def show_openapi(request: web.Request) -> web.Response:
    config = request.config_dict[CONFIG]
    modules: tuple[ModuleType, ...] = request.config_dict[API_MODULES]
    root_modules: tuple[ModuleType, ...] = request.config_dict[ROOT_MODULES_KEY]
    return web.json_response(
        openapi.document(config.server.api_url, modules, config.server.url, root_modules)
    )


OPERATIONS: Operations = {
    ("get", "/"): op(
        "API root: collection URLs", {"200": json_response("OK", ref("Root"))}, security=[]
    ),
    ("get", "/health"): op(
        "Database health",
        {
            "200": json_response("Healthy", ref("Health")),
            "503": json_response("Database unavailable", ref("Health")),
        },
        security=[],
        extension=True,
    ),
    ("get", "/openapi.json"): op(
        "This document",
        {"200": {"description": "OpenAPI 3.1 document"}},
        security=[],
        extension=True,
    ),
}
