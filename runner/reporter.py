"""The runner's Reporters: execution events written to PostgreSQL through marid/lifecycle.py
and marid/reports.py (`DbReporter`, an in-process runner), or sent to the API
(runner/remote.py `HttpReporter`, which the API applies with the same functions). Both buffer
and cap output the same way (`BufferedReporter`).

Each write is one short transaction that passes the lifecycle's fence first: once the build
has moved on (recovered by another runner, or finished) it changes nothing and raises
LostLease, so a vanished runner's late writes are harmless. A write that finds the database
away is tried again while the attempt's lease lasts (the worker's heartbeat keeps it), so a
short outage costs nothing. Output is buffered briefly and appended in chunks; live readers
(docs/api.md §19) wake when each chunk commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar

import asyncpg

from marid import lifecycle, output, reports
from marid.blobs import BlobStore
from marid.config import BuildsConfig
from marid.lifecycle import Claim, LostLease
from marid.listen import UNAVAILABLE
from marid.runner.execute import InfrastructureError, JobSpec, ObjectSpec, Reporter, describe

log = logging.getLogger(__name__)
T = TypeVar("T")
FLUSH_BYTES = 32 * 1024
FLUSH_DELAY = 0.1  # seconds: how stale live output may get
MAX_PENDING = 1024 * 1024  # characters buffered before a job's output waits for a flush
RETRY_FIRST, RETRY_MAX = 0.1, 1.0  # seconds between tries of a write while the database is away


class Lease:
    """An attempt's lease as its runner knows it: `renewed` is when the last renewal that worked
    was sent (time.monotonic()), so the database's lease ends no earlier than `renewed` +
    `seconds`. The heartbeat sets `lapsed`, with `reason`, once it stopped the attempt."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.renewed = time.monotonic()
        self.lapsed = False
        self.reason = lifecycle.LEASE_LOST

    def left(self) -> float:
        """Seconds until the lease runs out unless renewed."""
        return self.renewed + self.seconds - time.monotonic()

    def lapse(self, reason: str) -> None:
        self.lapsed, self.reason = True, reason


class Reporting(Reporter, Protocol):
    """A Reporter the worker also flushes and tells how the build ended."""

    async def flush(self) -> None: ...

    async def build_finished(
        self, status: str, kept: lifecycle.KeptWorkspace | None = None, keep_for: float = 0.0
    ) -> None: ...


class BufferedReporter(ABC):
    """The output buffering both reporters share: masked text is buffered briefly, capped at
    builds.max_output (output.Capped) and sent in chunks (`_append`); every write is tried
    again while the server cannot be reached and the lease lasts (`_retry`)."""

    def __init__(self, claim: Claim, lease: Lease, max_output: int) -> None:
        self.claim = claim
        self.lease = lease
        self.max_output = max_output  # builds.max_output: bytes kept of each job's output
        self.outputs: dict[int, output.Capped] = {}
        self.buffered = 0  # characters in `pending`
        self.flushing: asyncio.Future[None] | None = None
        self.pending: dict[int, list[str]] = {}
        self.flusher: asyncio.TimerHandle | None = None
        self.lock = asyncio.Lock()

    async def _retry(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, tried again while the server is away (UNAVAILABLE) and the lease lasts;
        LostLease once it lapsed."""
        delay = RETRY_FIRST
        while True:
            if self.lease.lapsed:
                raise LostLease(f"build {self.claim.build_id}: {self.lease.reason}")
            try:
                return await attempt()
            except UNAVAILABLE:
                if self.lease.left() <= 0:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    @abstractmethod
    async def _append(
        self, job_id: int, chunks: list[tuple[int, str]], forget: tuple[int, int] | None
    ) -> None:
        """Store the chunks (offset, text) of a job's output, then forget the byte range
        `forget`."""

    @abstractmethod
    async def _finish_job(
        self, job_id: int, status: str, ran: bool, written: output.Written | None
    ) -> None:
        """The job ended: its output stored once, as `written` accounts for it."""

    async def job_output(self, job: JobSpec, text: str) -> None:
        """Buffer `text`: a flush starts in the background at FLUSH_BYTES, or after
        FLUSH_DELAY; past MAX_PENDING the job's output waits for one (bounded memory)."""
        self.pending.setdefault(_job_id(job), []).append(text)
        self.buffered += len(text)
        if self.buffered >= MAX_PENDING:
            await self.flush()
        elif self.buffered >= FLUSH_BYTES:
            if self.flushing is None or self.flushing.done():
                self.flushing = asyncio.ensure_future(self.flush())
                self.flushing.add_done_callback(log_failure)
        elif self.flusher is None:
            loop = asyncio.get_running_loop()
            self.flusher = loop.call_later(FLUSH_DELAY, self._flush_later)

    def _flush_later(self) -> None:
        self.flusher = None
        task = asyncio.ensure_future(self.flush())
        task.add_done_callback(log_failure)

    async def flush(self) -> None:
        """Append buffered output as chunks (each wakes live readers)."""
        await self._place()

    async def _place(self) -> None:
        """Buffered output capped (output.Capped) and handed to `_append`."""
        async with self.lock:
            if self.flusher is not None:
                self.flusher.cancel()
                self.flusher = None
            pending, self.pending, self.buffered = self.pending, {}, 0
            for job_id, texts in pending.items():
                capped = self.outputs.setdefault(job_id, output.Capped(self.max_output))
                placed, forget = capped.place("".join(texts))
                chunks = split_chunks(placed)
                if chunks:
                    await self._append(job_id, chunks, forget)

    async def job_finished(self, job: JobSpec, status: str, ran: bool) -> None:
        await self._place()
        job_id = _job_id(job)
        capped = self.outputs.pop(job_id, None)
        await self._finish_job(job_id, status, ran, capped.written() if capped else None)


class DbReporter(BufferedReporter):
    """The in-process runner's reporter: each write one short transaction of its own."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        blobs: BlobStore,
        claim: Claim,
        api_url: str,
        lease: Lease,
        max_output: int = BuildsConfig.max_output,
    ) -> None:
        super().__init__(claim, lease, max_output)
        self.pool = pool
        self.api_url = api_url  # for webhook payloads
        self.blobs = blobs

    async def _write(self, write: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`write` in a transaction of its own (the fence's lock lasts until it ends), tried
        again while the database is away and the lease lasts; LostLease once it lapsed."""

        async def attempt() -> T:
            async with self.pool.acquire() as conn, conn.transaction():
                return await write(conn)

        return await self._retry(attempt)

    async def job_started(self, job: JobSpec) -> None:
        await self._write(lambda conn: lifecycle.job_started(conn, self.claim, _job_id(job)))

    async def _append(
        self, job_id: int, chunks: list[tuple[int, str]], forget: tuple[int, int] | None
    ) -> None:
        await self._write(lambda conn: reports.append(conn, self.claim, job_id, chunks, forget))

    async def _finish_job(
        self, job_id: int, status: str, ran: bool, written: output.Written | None
    ) -> None:
        try:
            await self._retry(
                lambda: reports.finish_job(
                    self.pool, self.blobs, self.claim, job_id, status, ran, written
                )
            )
        except reports.StorageFailed as exc:  # the blob store's: a new attempt
            raise InfrastructureError(str(exc)) from exc

    async def object_placed(self, obj: ObjectSpec) -> None:
        assert obj.id is not None  # the worker's objects are rows
        object_id = obj.id
        await self._write(lambda conn: lifecycle.object_placed(conn, self.claim, object_id))

    async def key_placed(self, name: str, location: str) -> None:
        await self._write(lambda conn: lifecycle.key_placed(conn, self.claim, name, location))

    async def artifact_collected(self, job: JobSpec, source: str, name: str, path: Path) -> None:
        try:
            blob = await self.blobs.put_file(path)
        except Exception as exc:  # the blob store's failure, not the user's: a new attempt
            raise InfrastructureError(f"storing artifact {name}: {describe(exc)}") from exc
        try:
            replaced = await self._write(
                lambda conn: lifecycle.artifact_recorded(
                    conn, self.claim, _job_id(job), source, name, blob
                )
            )
        except Exception:
            # Not recorded: leave nothing behind (or, with the store away too, the API's
            # reaper removes the blob without a row later).
            with contextlib.suppress(Exception):
                await self.blobs.delete(blob.key)
            raise
        if replaced:
            await self.blobs.delete(replaced)

    async def build_finished(
        self, status: str, kept: lifecycle.KeptWorkspace | None = None, keep_for: float = 0.0
    ) -> None:
        """The build ends with `status`, leaving `kept` for `keep_for` seconds."""
        await self.flush()
        await self._write(
            lambda conn: reports.finish_build(
                conn, self.claim, status, kept, keep_for, self.api_url
            )
        )


def split_chunks(placed: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """`placed` chunks cut into stored chunks of at most FLUSH_BYTES: readers read a bounded
    number of them at a time (marid/jobs.py)."""
    chunks = []
    for offset, text in placed:
        for piece in output.chunks(text, FLUSH_BYTES):
            chunks.append((offset, piece))
            offset += output.byte_length(piece)
    return chunks


def _job_id(job: JobSpec) -> int:
    assert job.id is not None  # the worker's jobs are rows
    return job.id


def log_failure(task: asyncio.Future[None]) -> None:
    """A timed flush has no caller to raise to; the next fenced write reports a lost lease."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("build output flush failed: %s", task.exception())
