"""The runner's Reporter: execution events written to PostgreSQL through marid/lifecycle.py.

Each write is one short transaction that passes the lifecycle's fence first: once the build
has moved on (recovered by another runner, or finished) it changes nothing and raises
LostLease, so a vanished runner's late writes are harmless. Output is buffered briefly and
appended in chunks; live readers (docs/api.md §19) wake when each chunk commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from marid import lifecycle, webhooks
from marid.blobs import BlobStore
from marid.lifecycle import Claim
from marid.runner.execute import JobSpec, ObjectSpec

log = logging.getLogger(__name__)
FLUSH_BYTES = 32 * 1024
FLUSH_DELAY = 0.1  # seconds: how stale live output may get


class DbReporter:
    def __init__(self, pool: asyncpg.Pool, blobs: BlobStore, claim: Claim, api_url: str) -> None:
        self.pool = pool
        self.api_url = api_url  # for webhook payloads
        self.blobs = blobs
        self.claim = claim
        self.offsets: dict[int, int] = {}
        self.pending: dict[int, list[str]] = {}
        self.flusher: asyncio.TimerHandle | None = None
        self.lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection in a transaction of its own: the fence's lock lasts until it ends."""
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn

    async def job_started(self, job: JobSpec) -> None:
        async with self._transaction() as conn:
            await lifecycle.job_started(conn, self.claim, _job_id(job))

    async def job_output(self, job: JobSpec, text: str) -> None:
        pending = self.pending.setdefault(_job_id(job), [])
        pending.append(text)
        if sum(len(t) for t in pending) >= FLUSH_BYTES:
            await self.flush()
        elif self.flusher is None:
            loop = asyncio.get_running_loop()
            self.flusher = loop.call_later(FLUSH_DELAY, self._flush_later)

    def _flush_later(self) -> None:
        self.flusher = None
        task = asyncio.ensure_future(self.flush())
        task.add_done_callback(_log_failure)

    async def flush(self) -> None:
        """Append buffered output as chunks (each wakes live readers)."""
        async with self.lock:
            if self.flusher is not None:
                self.flusher.cancel()
                self.flusher = None
            pending, self.pending = self.pending, {}
            for job_id, texts in pending.items():
                text = "".join(texts)
                offset = self.offsets.get(job_id, 0)
                async with self._transaction() as conn:
                    await lifecycle.append_output(conn, self.claim, job_id, offset, text)
                self.offsets[job_id] = offset + len(text.encode())

    async def job_finished(self, job: JobSpec, status: str, ran: bool) -> None:
        await self.flush()
        async with self._transaction() as conn:
            await lifecycle.job_finished(conn, self.claim, _job_id(job), status, ran)

    async def object_placed(self, obj: ObjectSpec) -> None:
        assert obj.id is not None  # the worker's objects are rows
        async with self._transaction() as conn:
            await lifecycle.object_placed(conn, self.claim, obj.id)

    async def key_placed(self, name: str, location: str) -> None:
        async with self._transaction() as conn:
            await lifecycle.key_placed(conn, self.claim, name, location)

    async def artifact_collected(self, job: JobSpec, source: str, name: str, path: Path) -> None:
        blob = await self.blobs.put_file(path)
        try:
            async with self._transaction() as conn:
                replaced = await lifecycle.artifact_recorded(
                    conn, self.claim, _job_id(job), source, name, blob
                )
        except (lifecycle.LostLease, LookupError):
            await self.blobs.delete(blob.key)  # not recorded: leave nothing behind
            raise
        if replaced:
            await self.blobs.delete(replaced)

    async def build_finished(self, status: str) -> None:
        await self.flush()
        async with self._transaction() as conn:
            await lifecycle.build_finished(conn, self.claim, status)
            await webhooks.emit_build(conn, self.claim.build_id, "build.finished", self.api_url)


def _job_id(job: JobSpec) -> int:
    assert job.id is not None  # the worker's jobs are rows
    return job.id


def _log_failure(task: asyncio.Future[None]) -> None:
    """A timed flush has no caller to raise to; the next fenced write reports a lost lease."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("build output flush failed: %s", task.exception())
