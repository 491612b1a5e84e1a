"""A runner's reports applied to the database and the blob store: the writes behind both an
in-process runner's reporter (runner/reporter.py DbReporter) and the API's runner endpoints
(api/runner.py), so that a build's rows end up the same whichever kind of runner ran it.

Every write passes the build's fence (marid/lifecycle.py) and raises LostLease once the attempt
no longer holds its build. Each function owns its transactions, except `append` (the caller's).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from marid import jobs, lifecycle, output, webhooks
from marid.blobs import Blob, BlobStore
from marid.lifecycle import Claim


class StorageFailed(Exception):
    """The blob store failed (not the user's doing): the runner retries, or hands back the
    attempt. str() names the step, never a secret."""


async def append(
    conn: asyncpg.Connection,
    claim: Claim,
    job_id: int,
    chunks: list[tuple[int, str]],
    forget: tuple[int, int] | None,
) -> None:
    """Store output chunks (offset, text) of a job, then forget the byte range `forget`
    (output.Capped): one transaction however much was buffered. Fenced."""
    for index, (offset, text) in enumerate(chunks):
        last = index == len(chunks) - 1
        await lifecycle.append_output(conn, claim, job_id, offset, text, forget if last else None)


async def finish_job(
    pool: asyncpg.Pool,
    blobs: BlobStore,
    claim: Claim,
    job_id: int,
    status: str,
    ran: bool,
    written: output.Written | None,
    ago: float = 0.0,
) -> None:
    """The job ended with `status`, `ago` seconds ago: its output, as `written` accounts for
    it, stored once (docs/architecture.md §6.1), then its row. A job that already ended (the
    report sent again after an answer was lost) is left as it is. Fenced."""
    if not (ran and written and written.rewritten):
        # Its output stays in its row (or it has none): one fenced statement, which leaves a
        # job that already ended as it ended.
        async with pool.acquire() as conn, conn.transaction():
            await lifecycle.job_finished(conn, claim, job_id, status, ran, ago=ago)
        return
    async with pool.acquire() as conn, conn.transaction():
        await lifecycle.fence(conn, claim)
        ended = await conn.fetchval(
            "SELECT finished_at IS NOT NULL FROM build_jobs WHERE id = $1 AND build_id = $2",
            job_id,
            claim.build_id,
        )
    if ended:
        return
    final = await store_output(pool, blobs, claim, job_id, written)
    try:
        async with pool.acquire() as conn, conn.transaction():
            await lifecycle.job_finished(conn, claim, job_id, status, ran, final, ago)
    except BaseException:
        if final is not None and final.blob_key is not None:
            with contextlib.suppress(Exception):  # else the API's reaper removes it
                await blobs.delete(final.blob_key)
        raise


async def store_output(
    pool: asyncpg.Pool, blobs: BlobStore, claim: Claim, job_id: int, written: output.Written
) -> output.Final | None:
    """The job's whole output stored once: None when it fits in its row as it is
    (lifecycle.job_finished joins the chunks there); else in the blob store, or as text for the
    row when the drop line made it short enough."""
    if not written.rewritten:
        return None
    line = written.drop_line() if written.dropped else ""
    size = written.printed - written.dropped + len(line.encode())
    head = written.head if written.dropped else None
    tail = written.tail if written.dropped else None
    pieces = _stored_pieces(pool, claim, job_id, head, line)
    if size <= output.ROW_LIMIT:
        text = b"".join([piece async for piece in pieces]).decode()
        return output.Final(size, written.printed, head, tail, text=text)
    try:
        blob = await blobs.put(pieces)
    except Exception as exc:  # the blob store's failure, not the user's: a new attempt
        raise StorageFailed(f"storing job output: {_describe(exc)}") from exc
    return output.Final(blob.size, written.printed, head, tail, blob_key=blob.key)


async def _stored_pieces(
    pool: asyncpg.Pool, claim: Claim, job_id: int, head: int | None, line: str
) -> AsyncIterator[bytes]:
    """The job's stored chunks in order, read back in bounded batches, with `line` where the
    head ends."""
    start = 0
    while True:
        async with pool.acquire() as conn:
            chunks = await jobs.chunks_from(conn, job_id, claim.attempt, start)
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


async def record_artifact(
    pool: asyncpg.Pool,
    blobs: BlobStore,
    claim: Claim,
    job_id: int,
    source: str,
    name: str,
    blob: Blob,
) -> None:
    """The artifact `name` now has the content `blob`: recorded, and the content it replaced
    deleted; when it cannot be recorded (LostLease, LookupError, the database away) `blob` is
    deleted before the error is raised. Fenced."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            replaced = await lifecycle.artifact_recorded(conn, claim, job_id, source, name, blob)
    except BaseException:
        # Not recorded: leave nothing behind (or, with the store away too, the API's reaper
        # removes the blob without a row later).
        with contextlib.suppress(Exception):
            await blobs.delete(blob.key)
        raise
    if replaced:
        with contextlib.suppress(Exception):  # else the API's reaper removes it later
            await blobs.delete(replaced)


async def finish_build(
    conn: asyncpg.Connection,
    claim: Claim,
    status: str,
    kept: lifecycle.KeptWorkspace | None,
    keep_for: float,
    api_url: str,
) -> None:
    """The build ends with `status`, leaving `kept` for `keep_for` seconds, and its
    `build.finished` webhooks are queued. Fenced; the caller owns the transaction."""
    await lifecycle.build_finished(conn, claim, status, kept, keep_for)
    await webhooks.emit_build(conn, claim.build_id, "build.finished", api_url)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc) or type(exc).__name__
