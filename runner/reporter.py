"""The runner's Reporter: execution events written to PostgreSQL, fenced by attempt.

Every statement names the (build, attempt) the runner claimed and changes nothing once the
build has moved on (recovered by another runner, or finished): a vanished runner's late
writes are harmless. Output is buffered briefly and appended in chunks, with a NOTIFY so
live readers (docs/api.md §19) wake up.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import asyncpg

from marid import webhooks
from marid.blobs import BlobStore
from marid.queue import Claim
from marid.runner.execute import JobSpec, ObjectSpec

log = logging.getLogger(__name__)
FLUSH_BYTES = 32 * 1024
FLUSH_DELAY = 0.1  # seconds: how stale live output may get
OUTPUT_CHANNEL = "marid_output"


class LostLease(Exception):
    """A fenced write matched nothing: this runner no longer holds the build."""


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

    async def _fenced(
        self, sql: str, *args: object, conn: asyncpg.Connection | None = None
    ) -> None:
        """Run an UPDATE whose WHERE names $1 = build id and $2 = attempt (on `conn` when
        given, to share its transaction); LostLease when it matched nothing."""
        run = conn.execute if conn is not None else self.pool.execute
        result = await run(sql, self.claim.build_id, self.claim.attempt, *args)
        if result.endswith(" 0"):
            raise LostLease()

    async def job_started(self, job: JobSpec) -> None:
        await self._fenced(
            """
            UPDATE build_jobs j SET status = 'running', started_at = now()
            FROM builds b
            WHERE b.id = $1 AND b.attempt = $2 AND b.status = 'running'
              AND j.build_id = b.id AND j.id = $3
            """,
            job.id,
        )

    async def job_output(self, job: JobSpec, text: str) -> None:
        assert job.id is not None
        pending = self.pending.setdefault(job.id, [])
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
        """Append buffered output as chunks and wake live readers."""
        async with self.lock:
            if self.flusher is not None:
                self.flusher.cancel()
                self.flusher = None
            pending, self.pending = self.pending, {}
            for job_id, texts in pending.items():
                text = "".join(texts)
                offset = self.offsets.get(job_id, 0)
                await self._append(job_id, offset, text)
                self.offsets[job_id] = offset + len(text.encode())

    async def _append(self, job_id: int, offset: int, text: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                """
                INSERT INTO build_job_output (job_id, attempt, byte_offset, text)
                SELECT $3, $2, $4, $5 FROM builds b
                WHERE b.id = $1 AND b.attempt = $2 AND b.status = 'running'
                RETURNING 1
                """,
                self.claim.build_id,
                self.claim.attempt,
                job_id,
                offset,
                text,
            )
            if inserted is None:
                raise LostLease()
            await conn.execute("SELECT pg_notify($1, $2)", OUTPUT_CHANNEL, str(job_id))

    async def job_finished(self, job: JobSpec, status: str, ran: bool) -> None:
        """Store the job's whole output in its row and drop the live chunks it was made of
        (readers of a finished job read the row)."""
        await self.flush()
        async with self.pool.acquire() as conn, conn.transaction():
            await self._fenced(
                """
                UPDATE build_jobs j SET status = $4, finished_at = now(),
                    started_at = CASE WHEN $5 THEN coalesce(j.started_at, now()) END,
                    output = CASE WHEN $5 THEN coalesce(
                        (SELECT string_agg(o.text, '' ORDER BY o.byte_offset)
                         FROM build_job_output o WHERE o.job_id = j.id AND o.attempt = $2), '')
                    END
                FROM builds b
                WHERE b.id = $1 AND b.attempt = $2 AND b.status = 'running'
                  AND j.build_id = b.id AND j.id = $3
                """,
                job.id,
                status,
                ran,
                conn=conn,
            )
            await conn.execute("DELETE FROM build_job_output WHERE job_id = $1", job.id)
        await self.pool.execute("SELECT pg_notify($1, $2)", OUTPUT_CHANNEL, str(job.id))

    async def object_placed(self, obj: ObjectSpec) -> None:
        await self._fenced(
            """
            UPDATE build_objects o SET placed = true FROM builds b
            WHERE b.id = $1 AND b.attempt = $2 AND b.status = 'running'
              AND o.build_id = b.id AND o.id = $3
            """,
            obj.id,
        )

    async def key_placed(self, name: str, location: str) -> None:
        await self._fenced(
            """
            UPDATE build_keys k SET location = $4 FROM builds b
            WHERE b.id = $1 AND b.attempt = $2 AND b.status = 'running'
              AND k.build_id = b.id AND k.name = $3
            """,
            name,
            location,
        )

    async def artifact_collected(self, job: JobSpec, source: str, name: str, path: Path) -> None:
        blob = await self.blobs.put_file(path)
        row = await self.pool.fetchrow(
            """
            WITH old AS (
                SELECT a.id, a.blob_key FROM build_artifacts a JOIN builds b ON b.id = a.build_id
                WHERE b.id = $1 AND b.attempt = $2 AND b.status = 'running' AND a.name = $3
                FOR UPDATE OF a
            )
            UPDATE build_artifacts a SET blob_key = $4, size = $5, md5 = $6, sha256 = $7,
                job_id = $8, source = $9
            FROM old WHERE a.id = old.id
            RETURNING old.blob_key AS replaced
            """,
            self.claim.build_id,
            self.claim.attempt,
            name,
            blob.key,
            blob.size,
            blob.md5,
            blob.sha256,
            job.id,
            source,
        )
        if row is None:  # not ours any more: leave nothing behind
            await self.blobs.delete(blob.key)
            raise LostLease()
        if row["replaced"]:
            await self.blobs.delete(row["replaced"])

    async def build_finished(self, status: str) -> None:
        await self.flush()
        async with self.pool.acquire() as conn, conn.transaction():
            await self._fenced(
                """
                UPDATE builds SET status = $3, finished_at = now(), lease_expires_at = NULL,
                    output = (SELECT string_agg(coalesce(j.output, ''), ''
                                                ORDER BY s.position, j.position)
                              FROM build_jobs j JOIN build_stages s ON s.id = j.stage_id
                              WHERE j.build_id = $1)
                WHERE id = $1 AND attempt = $2 AND status = 'running'
                """,
                status,
                conn=conn,
            )
            await webhooks.emit_build(conn, self.claim.build_id, "build.finished", self.api_url)


def artifacts_of(raw: str) -> list[tuple[str, str]]:
    return [(source, name) for source, name in json.loads(raw)]


def _log_failure(task: asyncio.Future[None]) -> None:
    """A timed flush has no caller to raise to; the next fenced write reports a lost lease."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("build output flush failed: %s", task.exception())
