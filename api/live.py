"""One LISTEN connection per API process, fanning database notifications out to waiters.

Runners `NOTIFY marid_output, '<job id>'` when they append output; SSE handlers wait here
instead of each holding a database connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator

import asyncpg
from aiohttp import web

from marid import channels
from marid.api.keys import CONFIG

log = logging.getLogger(__name__)


class Live:
    def __init__(self) -> None:
        self.waiters: dict[int, set[asyncio.Event]] = defaultdict(set)
        self.conn: asyncpg.Connection | None = None

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            for event in self.waiters.get(int(payload), ()):
                event.set()

    @contextlib.contextmanager
    def subscribe(self, job_id: int) -> Iterator[asyncio.Event]:
        """An event set by every notification about the job while the block runs.

        Clear it *before* reading the job, then wait on it: a notification that arrives
        during the read is not lost (the reader finds the event already set).
        """
        event = asyncio.Event()
        self.waiters[job_id].add(event)
        try:
            yield event
        finally:
            self.waiters[job_id].discard(event)
            if not self.waiters[job_id]:
                del self.waiters[job_id]

    async def start(self, dsn: str) -> None:
        self.conn = await asyncpg.connect(dsn)
        await self.conn.add_listener(channels.OUTPUT, self._notified)

    async def stop(self) -> None:
        if self.conn is not None:
            await self.conn.close()


LIVE = web.AppKey("live", Live)


async def live_context(app: web.Application) -> AsyncIterator[None]:
    app[LIVE] = Live()
    await app[LIVE].start(app[CONFIG].database.dsn)
    yield
    await app[LIVE].stop()
