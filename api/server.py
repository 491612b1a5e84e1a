"""Running the API on a TCP socket until told to stop."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from marid import reaper
from marid.api.app import create_app
from marid.api.keys import BLOBS, CONFIG, POOL
from marid.config import Config

log = logging.getLogger(__name__)
BACKLOG = 128  # aiohttp's default for the sites it binds itself


def split_listen(listen: str) -> tuple[str, int]:
    """`host:port` (IPv6 hosts in brackets) from `server.listen`."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of `host` (as aiohttp's own TCP site would bind);
    raises OSError, e.g. when the port is taken.

    Bound before anything else starts, so a taken port is reported before any state is
    created, and handed to `start` itself, so nothing can take the port in between
    (docs/architecture.md, `marid up`).
    """
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # A restart must not wait out the previous run's TIME_WAIT connections; a port
            # another socket listens on still fails with EADDRINUSE.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], port, *address[2:]))
            sock.listen(BACKLOG)  # listening, the port is ours: no other bind can share it
            port = sock.getsockname()[1]  # with port 0, every address gets the first one's
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def address(sock: socket.socket) -> str:
    """`host:port` of a bound socket, an IPv6 host in brackets."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


async def start(config: Config, sockets: list[socket.socket] | None = None) -> web.AppRunner:
    """Serve on `sockets` (default: bind `server.listen`); the caller calls `runner.cleanup()`
    to stop."""
    sockets = sockets or bind(*split_listen(config.server.listen))
    app = create_app(config)
    app.cleanup_ctx.append(reaper_context)  # after the pool and the blob store: stops first
    # server.header_timeout (docs/security.md §5.2): aiohttp's keep-alive timer closes a
    # connection still waiting for a complete request line and headers `keepalive_timeout`
    # seconds after it opened or after its previous response, whether none of the next request
    # came or only some of it; so it bounds how long a request's head may take from the moment
    # the server waits for it, and idle keep-alive connections end after the same time. (A
    # timer from a request's first byte would need the state of aiohttp's C parser, which it
    # does not show: bytes of a next request that come with the end of the previous one could
    # not be told from none.) A request whose head is complete is not timed here: its body has
    # server.body_timeout (api/http.py's body_timeout middleware), its handler no limit.
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=config.server.header_timeout,
    )
    await runner.setup()
    for sock in sockets:
        await web.SockSite(runner, sock, backlog=BACKLOG).start()
    where = ", ".join(address(sock) for sock in sockets)
    log.info("API listening on %s, base URL %s", where, config.server.api_url)
    return runner


async def reaper_context(app: web.Application) -> AsyncIterator[None]:
    """The API's reaper (marid/reaper.py) for as long as the app runs: a sweep at start, then
    one every `reaper.interval` (docs/configuration.md §1.3)."""
    settings = app[CONFIG].reaper
    sweeper = reaper.Reaper(app[POOL], app[BLOBS], settings.grace)
    stop = asyncio.Event()
    task = asyncio.create_task(reaper.repeat(sweeper.tick, settings.interval, stop, "reaper"))
    yield
    stop.set()
    task.cancel()  # a sweep in progress stops at its next await; what it removed stays removed
    await asyncio.gather(task, return_exceptions=True)


async def serve_until(
    config: Config, stop: asyncio.Event, sockets: list[socket.socket] | None = None
) -> None:
    runner = await start(config, sockets)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
