"""One LISTEN connection per API process, fanning database notifications out to waiters.

Runners `NOTIFY marid_output, '<job id>'` when they append output or a job ends; triggers
`NOTIFY marid_access` when who may read a build changes, and `marid_builds` when the queue
changes (runners on other machines wait for work here: api/runner.py). SSE handlers wait here
instead of each holding a database connection, and never poll (issue 11 row 13).

It is also the process's watch on the database (docs/api.md §1.4): the LISTEN connection is the
first to see PostgreSQL go away, and requests that find it away say so. Either way the outage
is logged once, a task reconnects with capped backoff, and the return is logged once too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator

import asyncpg
from aiohttp import web

from marid import channels
from marid.api.keys import CONFIG, POOL

log = logging.getLogger(__name__)
RETRY_MIN, RETRY_MAX = 0.5, 5.0  # seconds between reconnection attempts, doubling
PROBE_TIMEOUT = 5.0  # seconds one attempt (connect, LISTEN, SELECT 1 on the pool) may take


class Live:
    def __init__(self, dsn: str, pool: asyncpg.Pool) -> None:
        self.dsn, self.pool = dsn, pool
        self.waiters: dict[int, set[asyncio.Event]] = defaultdict(set)
        # Bumped whenever readers' access may have changed (an `ACCESS` notification, or an
        # outage in which one may have been missed): streams re-check their reader then.
        self.access_generation = 0
        self.conn: asyncpg.Connection | None = None
        self.down_since: float | None = None  # time.monotonic() when this outage was seen
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        # Set (and replaced) by every `BUILDS` notification: runner claims waiting for work
        # (api/runner.py) wait on it.
        self._queue = asyncio.Event()

    def queue_event(self) -> asyncio.Event:
        """An event set by the next change to the queue (or an outage, in which one may have
        been missed). Take it before looking at the queue, then wait on it."""
        return self._queue

    def _queue_changed(self, *_args: object) -> None:
        self._queue.set()
        self._queue = asyncio.Event()

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            for event in self.waiters.get(int(payload), ()):
                event.set()

    def _access_changed(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        self._wake_all()

    def _wake_all(self) -> None:
        self._queue_changed()
        self.access_generation += 1
        for events in self.waiters.values():
            for event in events:
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

    async def start(self) -> None:
        await self._listen()

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.add_listener(channels.OUTPUT, self._notified)
            await conn.add_listener(channels.ACCESS, self._access_changed)
            await conn.add_listener(channels.BUILDS, self._queue_changed)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._lost)
        self.conn = conn

    def _lost(self, conn: object) -> None:
        if conn is self.conn:
            # Forgotten, whether or not asyncpg has marked it closed yet: the database is back
            # only once a new LISTEN connection is made. A pooled connection may still answer
            # for a moment while the server shuts down, and must not end the outage.
            self.conn = None
        if not self._stopping:
            self.database_away("connection lost")

    def database_away(self, reason: str) -> None:
        """Note that the database cannot be used: logged once per outage, then a task
        reconnects until it answers again."""
        if self._stopping or self.down_since is not None:
            return
        self.down_since = time.monotonic()
        log.warning("database unavailable (%s): requests answer 503 until it is back", reason)
        self._watch = asyncio.create_task(self._reconnect())
        # Streams waiting for a notification would wait through the outage: they look now,
        # find the database gone and end, for their clients to resume once it is back.
        self._wake_all()

    async def _reconnect(self) -> None:
        delay = RETRY_MIN
        while not await self._answers():
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
        assert self.down_since is not None
        log.info("database available again after %.1f s", time.monotonic() - self.down_since)
        self.down_since = None
        # Notifications sent while the LISTEN connection was gone are lost: readers look again,
        # and check again that they may.
        self._wake_all()

    async def _answers(self) -> bool:
        """Whether the LISTEN connection is (re)established and the pool answers `SELECT 1`."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                if self.conn is None or self.conn.is_closed():
                    await self._listen()
                async with self.pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
        except Exception:  # any failure means "not yet"; the outage was logged when it began
            return False
        return True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def drain(self) -> None:
        """The server is stopping: claims waiting for work answer now, not after their wait
        (app.on_shutdown, before the server waits for its requests to end)."""
        self._stopping = True
        self._queue_changed()

    async def stop(self) -> None:
        self.drain()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.conn is not None:
            await self.conn.close()


LIVE = web.AppKey("live", Live)


async def live_context(app: web.Application) -> AsyncIterator[None]:
    app[LIVE] = Live(app[CONFIG].database.dsn, app[POOL])
    await app[LIVE].start()
    yield
    await app[LIVE].stop()
