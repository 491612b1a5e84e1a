"""Typed keys for what the application carries (config, pool)."""

from __future__ import annotations

from types import ModuleType

import asyncpg
from aiohttp import web

from marid.config import Config

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", asyncpg.Pool)
# The path of the API base URL (e.g. "/api"), set on the app serving the API routes.
API_PREFIX = web.AppKey("api_prefix", str)
# The API modules served (and documented) by this app.
API_MODULES = web.AppKey("api_modules", tuple[ModuleType, ...])
