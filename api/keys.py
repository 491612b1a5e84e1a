"""Typed keys for what the application carries (config, pool)."""

from __future__ import annotations

from types import ModuleType

import asyncpg
from aiohttp import web

from marid.blobs import BlobStore
from marid.config import Config
from marid.crypto import Cipher
from marid.metrics import Http
from marid.ratelimit import Limiter

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", asyncpg.Pool)
BLOBS = web.AppKey("blobs", BlobStore)
CIPHER = web.AppKey("cipher", Cipher)
# This process's HTTP figures for GET /metrics (docs/api.md §21).
HTTP_METRICS = web.AppKey("http_metrics", Http)
# The per-process rate limiter (docs/api.md §20); absent when rate_limit.enabled is false.
RATE_LIMITER = web.AppKey("rate_limiter", Limiter)
# The path of the API base URL (e.g. "/api"), set on the app serving the API routes.
API_PREFIX = web.AppKey("api_prefix", str)
# The API modules served (and documented) by this app.
API_MODULES = web.AppKey("api_modules", tuple[ModuleType, ...])
# The modules served at the server root (outside the API base), e.g. OAuth.
ROOT_MODULES_KEY = web.AppKey("root_modules", tuple[ModuleType, ...])
# The web interface's session cookie (api/web, marid/sessions.py).
SESSION_COOKIE = "marid_session"
