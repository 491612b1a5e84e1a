"""The API root (docs/api.md §5), health, metrics and the OpenAPI document (docs/api.md §21)."""

from __future__ import annotations

import asyncio
import hmac
from types import ModuleType

import asyncpg
from aiohttp import web

from marid import __version__, metrics
from marid.api import errors, openapi
from marid.api.http import api_url
from marid.api.keys import API_MODULES, CONFIG, HTTP_METRICS, POOL, ROOT_MODULES_KEY
from marid.api.openapi import Operations, json_response, op, ref

routes = web.RouteTableDef()
HEALTH_TIMEOUT = 2.0
DATABASE_ERRORS = (
    TimeoutError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a query on a connection the server is closing
)
COLLECTIONS = ("builds", "namespaces", "cron", "invites", "images", "objects", "variables", "keys")


@routes.get("/")
async def show_root(request: web.Request) -> web.Response:
    base = api_url(request)
    return web.json_response({f"{name}_url": f"{base}/{name}" for name in COLLECTIONS})


@routes.get("/health")
async def show_health(request: web.Request) -> web.Response:
    """200 when `SELECT 1` answers within 2 s, else 503 saying why (docs/api.md §21)."""
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            async with request.config_dict[POOL].acquire() as conn:
                await conn.fetchval("SELECT 1")
    except DATABASE_ERRORS as exc:
        reason = errors.database_unavailable(exc)
        if reason is None and isinstance(exc, TimeoutError):  # our own limit
            reason = "not answering"
        if reason is not None:
            errors.note_outage(request, reason)
        body = {
            "status": "unavailable",
            "database": "unavailable",
            "version": __version__,
            "reason": reason or "error",
            "message": errors.UNAVAILABLE,
        }
        return web.json_response(body, status=503, headers=errors.RETRY_HEADERS)
    return web.json_response({"status": "ok", "database": "ok", "version": __version__})


@routes.get("/metrics")
async def show_metrics(request: web.Request) -> web.Response:
    """Prometheus text format, or OpenMetrics when `Accept` prefers it; a bearer
    `metrics.token` is required when one is configured."""
    expected = request.config_dict[CONFIG].metrics.token
    if expected is not None:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            return web.json_response({"message": "Unauthorized"}, status=401)
    found: metrics.Totals | None
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            async with request.config_dict[POOL].acquire() as conn:
                found = await metrics.totals(conn)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        found = None
    openmetrics = metrics.wants_openmetrics(request.headers.get("Accept", ""))
    text = metrics.render(request.config_dict[HTTP_METRICS], found, openmetrics)
    kind = metrics.OPENMETRICS_TYPE if openmetrics else metrics.CONTENT_TYPE
    return web.Response(body=text.encode(), headers={"Content-Type": kind, "Vary": "Accept"})


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
            "503": {
                **json_response("Database unavailable", ref("Health")),
                "headers": openapi.RETRY_AFTER_HEADER,
            },
        },
        security=[],
        extension=True,
    ),
    ("get", "/metrics"): op(
        "Prometheus metrics, text format 0.0.4, or OpenMetrics 1.0.0 when Accept prefers it"
        " (bearer metrics.token when configured)",
        {
            "200": {
                "description": "Metrics",
                "content": {
                    "text/plain": {"schema": {"type": "string"}},
                    "application/openmetrics-text": {"schema": {"type": "string"}},
                },
            },
            "401": json_response("metrics.token required", ref("Message")),
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
