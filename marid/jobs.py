"""Jobs of a build (docs/api.md §7.1, §7.8, §7.9) and their output (docs/api.md §19).

A finished job's output is stored once (docs/architecture.md §6.1): in its row (at most
output.ROW_LIMIT bytes), in the blob store (`output_blob_key`), or as the chunks it was
written in. Nothing here loads more than a bounded amount of it: entities embed an `Excerpt`
(at most output.EMBED_LIMIT bytes per job), and `read` yields it in pieces of at most
READ_BYTES.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import asyncpg

from marid import output
from marid.blobs import BlobStore
from marid.times import rfc3339

READ_BYTES = 1024 * 1024  # at most this much output is read at once (plus one chunk)
CHUNK_ROWS = 16  # stored chunks per read: live chunks hold at most 64 KiB or so


@dataclass(frozen=True)
class Excerpt:
    """A bounded view of a job's output: all of it, or its last bytes."""

    text: str
    size: int  # bytes of the whole output

    def render(self, output_url: str) -> str:
        """The text, opened by a line naming `output_url` when it is not the whole output."""
        shown = output.byte_length(self.text)
        if shown >= self.size:
            return self.text
        return output.excerpt_line(shown, self.size, output_url) + self.text


@dataclass(frozen=True)
class Stored:
    """Where a job's output is and how it was kept (migrations/0014_output_storage.sql)."""

    attempt: int  # the build's attempt: live chunks of other attempts are stale
    text: str | None  # in the row
    blob_key: str | None  # in the blob store
    size: int | None  # bytes, once the job has ended (else None)
    printed: int | None
    head: int | None  # bytes before the drop line, when output was dropped
    tail: int | None

    @property
    def ended(self) -> bool:
        """Whether the output is complete (else it is live chunks, or none)."""
        return self.size is not None


@dataclass(frozen=True)
class Job:
    id: int
    build_id: int
    stage: str
    name: str
    commands: str
    status: str
    stored: Stored
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    output: Excerpt | None = None  # set by `list_for` and `get_by_name`
    # A resumed build's job that did not run: the number of the build whose job of the same
    # name it reuses (same owner; docs/api.md §27).
    reused_from: int | None = None


def url_segment(name: str) -> str:
    """`name` (a job's, or one `/`-separated part of an artifact's or tag's) as one URL path
    segment: percent-encoded, so that `a b?c#d` names exactly itself. `.` and `..`, which URL
    clients resolve away, go as `%2E` (curl and requests keep that; browsers and yarl follow
    the WHATWG URL standard, which resolves it too)."""
    if name in (".", ".."):
        return name.replace(".", "%2E")
    return quote(name, safe="")


def to_json(job: Job, build_url: str, build: dict[str, Any]) -> dict[str, Any]:
    """The Job entity; `build` is the embedded Build."""
    url = f"{build_url}/jobs/{url_segment(job.name)}"
    return {
        "id": job.id,
        "build_id": job.build_id,
        "stage": job.stage,
        "name": job.name,
        "commands": job.commands,
        "status": job.status,
        "output": job.output.render(url + "/output") if job.output else None,
        "created_at": rfc3339(job.created_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
        "reused_from": (
            f"{build_url.rsplit('/', 1)[0]}/{job.reused_from}/jobs/{url_segment(job.name)}"
            if job.reused_from is not None
            else None
        ),
        "url": url,
        "build": build,
    }


_COLUMNS = """
    j.id, j.build_id, s.name AS stage, j.name, j.commands, j.status, j.created_at,
    j.started_at, j.finished_at, b.attempt, j.output, j.output_blob_key, j.output_size,
    j.output_printed, j.output_head, j.output_tail,
    (SELECT rb.number FROM build_jobs rj JOIN builds rb ON rb.id = rj.build_id
     WHERE rj.id = j.reused_from) AS reused_from
"""


def _job(row: asyncpg.Record) -> Job:
    data = dict(row)
    stored = Stored(
        data.pop("attempt"),
        data.pop("output"),
        data.pop("output_blob_key"),
        data.pop("output_size"),
        data.pop("output_printed"),
        data.pop("output_head"),
        data.pop("output_tail"),
    )
    return Job(**data, stored=stored)


async def list_for(
    conn: asyncpg.Connection,
    build_id: int,
    name: str | None = None,
    status: str | None = None,
    blobs: BlobStore | None = None,
) -> list[Job]:
    """A build's jobs in execution order, filtered by name substring and status (§7.8), each
    with its output's excerpt."""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS}
        FROM build_jobs j JOIN build_stages s ON s.id = j.stage_id
        JOIN builds b ON b.id = j.build_id
        WHERE j.build_id = $1
          AND ($2::text IS NULL OR strpos(lower(j.name), lower($2)) > 0)
          AND ($3::text IS NULL OR j.status = $3
               OR ($3 = 'passed' AND j.status = 'passed_with_failures'))
        ORDER BY s.position, j.position
        """,  # noqa: S608 (a constant column list)
        build_id,
        name,
        status,
    )
    return [await with_excerpt(conn, _job(row), blobs) for row in rows]


async def of_builds(
    conn: asyncpg.Connection, build_ids: list[int], blobs: BlobStore | None
) -> dict[int, list[Job]]:
    """The jobs of each of these builds in execution order, with their excerpts."""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS}
        FROM build_jobs j JOIN build_stages s ON s.id = j.stage_id
        JOIN builds b ON b.id = j.build_id
        WHERE j.build_id = ANY($1::bigint[])
        ORDER BY j.build_id, s.position, j.position
        """,  # noqa: S608 (a constant column list)
        build_ids,
    )
    found: dict[int, list[Job]] = {}
    for row in rows:
        job = await with_excerpt(conn, _job(row), blobs)
        found.setdefault(job.build_id, []).append(job)
    return found


async def get_by_name(
    conn: asyncpg.Connection,
    build_id: int,
    name: str,
    blobs: BlobStore | None = None,
    excerpt: bool = True,
) -> Job | None:
    """The job, with its output's excerpt unless `excerpt` is false."""
    row = await conn.fetchrow(
        f"""
        SELECT {_COLUMNS}
        FROM build_jobs j JOIN build_stages s ON s.id = j.stage_id
        JOIN builds b ON b.id = j.build_id
        WHERE j.build_id = $1 AND j.name = $2
        """,  # noqa: S608 (a constant column list)
        build_id,
        name,
    )
    if row is None:
        return None
    return await with_excerpt(conn, _job(row), blobs) if excerpt else _job(row)


async def with_excerpt(conn: asyncpg.Connection, job: Job, blobs: BlobStore | None) -> Job:
    """`job` with the excerpt its entity embeds (docs/api.md §7.1): its whole output up to
    output.EMBED_LIMIT bytes, else the last EMBED_LIMIT bytes. Without `blobs` an output in
    the blob store is represented by the line naming the raw endpoint alone."""
    stored = job.stored
    if not stored.ended:
        return job
    assert stored.size is not None
    if stored.text is not None and output.byte_length(stored.text) <= output.EMBED_LIMIT:
        excerpt = Excerpt(stored.text, stored.size)
    elif stored.blob_key is not None and blobs is None:
        excerpt = Excerpt("", stored.size)
    else:
        start = max(0, stored.size - output.EMBED_LIMIT)
        pieces = [piece async for _, piece in read(conn, blobs, job, start)]
        excerpt = Excerpt("".join(pieces), stored.size)
    return dataclasses.replace(job, output=excerpt)


def length(job: Job, live_total: int) -> int:
    """Bytes of the job's output: stored, or `live_total` written so far."""
    return job.stored.size if job.stored.size is not None else live_total


async def read(
    conn: asyncpg.Connection | None,
    blobs: BlobStore | None,
    job: Job,
    start: int,
    end: int | None = None,
) -> AsyncIterator[tuple[int, str]]:
    """The job's output from byte `start` (moved forward to a character start) to `end`
    (default: all) as (offset, text) pieces of at most READ_BYTES or so, wherever it is
    stored: the row, the blob store, or chunks (live ones while the job runs; after a gap where
    output was dropped the next offset jumps). `conn` may be None for the blob store."""
    stored = job.stored
    if stored.text is not None:
        data = stored.text.encode()[:end]
        start = output.char_boundary(data, start)
        for text in output.chunks(data[start:].decode(), READ_BYTES):
            yield start, text
            start += output.byte_length(text)
    elif stored.blob_key is not None:
        assert blobs is not None, "a blob store is needed to read this output"
        async for offset, text in _read_blob(blobs, stored.blob_key, start, end):
            yield offset, text
    else:
        assert conn is not None
        while end is None or start < end:
            chunks = await chunks_from(conn, job.id, stored.attempt, start)
            if not chunks:
                return
            for offset, text in chunks:
                data = text.encode()
                if end is not None and offset + len(data) > end:
                    data = data[: output.boundary_before(data, end - offset)]
                if data:
                    yield offset, data.decode()
                start = offset + len(data)
                if end is not None and start >= end:
                    return


async def _read_blob(
    blobs: BlobStore, key: str, start: int, end: int | None
) -> AsyncIterator[tuple[int, str]]:
    """UTF-8 text of the blob from `start` to `end`, cut on character boundaries."""
    chunks = await blobs.open_at(key, start)
    held, position, first = b"", start, True  # position: where `held` begins
    try:
        async for chunk in chunks:
            data = held + chunk
            if first:  # `start` may fall inside a character
                skip = output.char_boundary(data, 0)
                data, position, first = data[skip:], position + skip, False
            if end is not None and position + len(data) >= end:
                data = data[: output.boundary_before(data, end - position)]
                if data:
                    yield position, data.decode(errors="replace")
                return
            cut = _complete(data)  # an incomplete character waits for the next chunk
            held, data = data[cut:], data[:cut]
            if data:
                yield position, data.decode()
                position += len(data)
        if held:
            yield position, held.decode(errors="replace")
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


def final_offset(stored: Stored, printed: int) -> int:
    """Where byte `printed`, counted in what the job printed (as live offsets are while it
    runs), falls in its stored output once it has ended: the same place, unless output was
    dropped; a place in the dropped part maps to the drop line (docs/api.md §19)."""
    if stored.head is None or stored.tail is None or stored.size is None or printed <= stored.head:
        return printed
    assert stored.printed is not None
    if printed < stored.printed - stored.tail:
        return stored.head
    return stored.size - (stored.printed - printed)


def _complete(data: bytes) -> int:
    """The length of the longest prefix of `data` that ends with a whole UTF-8 character."""
    if not data:
        return 0
    last = output.boundary_before(data, len(data) - 1)
    lead = data[last]
    need = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
    return len(data) if len(data) - last >= need else last


async def chunks_from(
    conn: asyncpg.Connection, job_id: int, attempt: int, start: int
) -> list[tuple[int, str]]:
    """Up to CHUNK_ROWS stored chunks of the attempt that end after byte `start`, in order, as
    (offset, text); one that starts before `start` is cut there (at a character start)."""
    rows = await conn.fetch(
        """
        SELECT byte_offset, text FROM build_job_output
        WHERE job_id = $1 AND attempt = $2
          AND byte_offset >= coalesce(
              (SELECT max(byte_offset) FROM build_job_output
               WHERE job_id = $1 AND attempt = $2 AND byte_offset <= $3), 0)
        ORDER BY byte_offset LIMIT $4
        """,
        job_id,
        attempt,
        start,
        CHUNK_ROWS,
    )
    found = []
    for row in rows:
        offset, text = row["byte_offset"], row["text"]
        if offset < start:
            data = text.encode()
            if offset + len(data) <= start:
                continue  # ends before `start` (the bytes after it were dropped)
            cut = output.char_boundary(data, start - offset)
            offset, text = offset + cut, data[cut:].decode()
        found.append((offset, text))
    return found


async def live_total(conn: asyncpg.Connection, job: Job) -> int:
    """Bytes of live output written so far for the job's current attempt."""
    total = await conn.fetchval(
        """
        SELECT byte_offset + octet_length(text) FROM build_job_output
        WHERE job_id = $1 AND attempt = $2 ORDER BY byte_offset DESC LIMIT 1
        """,
        job.id,
        job.stored.attempt,
    )
    return int(total or 0)
