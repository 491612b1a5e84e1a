"""The runner's Reporter: execution events written to PostgreSQL through marid/lifecycle.py.

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
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg

from marid import jobs, lifecycle, output, webhooks
from marid.blobs import BlobStore
from marid.config import BuildsConfig
from marid.lifecycle import Claim, LostLease
from marid.listen import UNAVAILABLE
from marid.runner.execute import InfrastructureError, JobSpec, ObjectSpec, describe

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


class DbReporter:
    def __init__(
        self,
        pool: asyncpg.Pool,
        blobs: BlobStore,
        claim: Claim,
        api_url: str,
        lease: Lease,
        max_output: int = BuildsConfig.max_output,
    ) -> None:
        self.pool = pool
        self.api_url = api_url  # for webhook payloads
        self.blobs = blobs
        self.claim = claim
        self.lease = lease
        self.max_output = max_output  # builds.max_output: bytes kept of each job's output
        self.outputs: dict[int, output.Capped] = {}
        self.buffered = 0  # characters in `pending`
        self.flushing: asyncio.Future[None] | None = None
        self.pending: dict[int, list[str]] = {}
        self.flusher: asyncio.TimerHandle | None = None
        self.lock = asyncio.Lock()

    async def _write(self, write: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`write` in a transaction of its own (the fence's lock lasts until it ends), tried
        again while the database is away and the lease lasts; LostLease once it lapsed."""
        delay = RETRY_FIRST
        while True:
            if self.lease.lapsed:
                raise LostLease(f"build {self.claim.build_id}: {self.lease.reason}")
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    return await write(conn)
            except UNAVAILABLE:
                if self.lease.left() <= 0:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def job_started(self, job: JobSpec) -> None:
        await self._write(lambda conn: lifecycle.job_started(conn, self.claim, _job_id(job)))

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
                self.flushing.add_done_callback(_log_failure)
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
            pending, self.pending, self.buffered = self.pending, {}, 0
            for job_id, texts in pending.items():
                capped = self.outputs.setdefault(job_id, output.Capped(self.max_output))
                placed, forget = capped.place("".join(texts))
                chunks = _split(placed)
                if chunks:
                    await self._write(self._appending(job_id, chunks, forget))

    def _appending(
        self, job_id: int, chunks: list[tuple[int, str]], forget: tuple[int, int] | None
    ) -> Callable[[asyncpg.Connection], Awaitable[None]]:
        """Every chunk in one transaction (one commit however much was buffered), then the
        window's oldest chunks forgotten (output.Capped)."""

        async def append(conn: asyncpg.Connection) -> None:
            for index, (offset, text) in enumerate(chunks):
                last = index == len(chunks) - 1
                await lifecycle.append_output(
                    conn, self.claim, job_id, offset, text, forget if last else None
                )

        return append

    async def job_finished(self, job: JobSpec, status: str, ran: bool) -> None:
        await self.flush()
        job_id = _job_id(job)
        capped = self.outputs.pop(job_id, None)
        final = await self._store_output(job_id, capped) if ran and capped else None
        try:
            await self._write(
                lambda conn: lifecycle.job_finished(conn, self.claim, job_id, status, ran, final)
            )
        except Exception:
            if final is not None and final.blob_key is not None:
                with contextlib.suppress(Exception):  # else the API's reaper removes it
                    await self.blobs.delete(final.blob_key)
            raise

    async def _store_output(self, job_id: int, capped: output.Capped) -> output.Final | None:
        """The job's whole output stored once (docs/architecture.md §6.1): None when it fits
        in its row as it is (lifecycle.job_finished joins the chunks there); else in the blob
        store, or as text for the row when the drop line made it short enough."""
        if not capped.dropped and capped.printed <= output.ROW_LIMIT:
            return None
        line = capped.drop_line() if capped.dropped else ""
        size = capped.printed - capped.dropped + len(line.encode())
        head = capped.head if capped.dropped else None
        tail = capped.tail if capped.dropped else None
        pieces = self._stored_pieces(job_id, head, line)
        if size <= output.ROW_LIMIT:
            text = b"".join([piece async for piece in pieces]).decode()
            return output.Final(size, capped.printed, head, tail, text=text)
        try:
            blob = await self.blobs.put(pieces)
        except Exception as exc:  # the blob store's failure, not the user's: a new attempt
            raise InfrastructureError(f"storing job output: {describe(exc)}") from exc
        return output.Final(blob.size, capped.printed, head, tail, blob_key=blob.key)

    async def _stored_pieces(
        self, job_id: int, head: int | None, line: str
    ) -> AsyncIterator[bytes]:
        """The job's stored chunks in order, read back in bounded batches, with `line` where
        the head ends."""
        start = 0
        while True:
            async with self.pool.acquire() as conn:
                chunks = await jobs.chunks_from(conn, job_id, self.claim.attempt, start)
            if not chunks:
                break
            for offset, text in chunks:
                if head is not None and offset >= head:
                    yield line.encode()
                    head = None
                yield text.encode()
                start = offset + len(text.encode())
        if head is not None:
            yield line.encode()

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

        async def finish(conn: asyncpg.Connection) -> None:
            await lifecycle.build_finished(conn, self.claim, status, kept, keep_for)
            await webhooks.emit_build(conn, self.claim.build_id, "build.finished", self.api_url)

        await self._write(finish)


def _split(placed: list[tuple[int, str]]) -> list[tuple[int, str]]:
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


def _log_failure(task: asyncio.Future[None]) -> None:
    """A timed flush has no caller to raise to; the next fenced write reports a lost lease."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("build output flush failed: %s", task.exception())
