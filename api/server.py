"""Running the API on a TCP socket until told to stop."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from marid.api.app import create_app
from marid.config import Config

log = logging.getLogger(__name__)


def split_listen(listen: str) -> tuple[str, int]:
    """`host:port` (IPv6 hosts in brackets) from `server.listen`."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def start(config: Config) -> web.AppRunner:
    """Start serving on `server.listen`; the caller calls `runner.cleanup()` to stop."""
    runner = web.AppRunner(create_app(config), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = split_listen(config.server.listen)
    await web.TCPSite(runner, host, port).start()
    log.info("API listening on %s:%d, base URL %s", host, port, config.server.api_url)
    return runner


async def serve_until(config: Config, stop: asyncio.Event) -> None:
    runner = await start(config)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
