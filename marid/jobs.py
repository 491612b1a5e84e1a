"""Jobs of a build (docs/api.md §7.1, §7.8, §7.9) and their output (docs/api.md §19)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from marid import output
from marid.times import rfc3339


@dataclass(frozen=True)
class Job:
    id: int
    build_id: int
    stage: str
    name: str
    commands: str
    status: str
    output: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


def to_json(job: Job, build_url: str, build: dict[str, Any]) -> dict[str, Any]:
    """The Job entity; `build` is the embedded Build."""
    return {
        "id": job.id,
        "build_id": job.build_id,
        "stage": job.stage,
        "name": job.name,
        "commands": job.commands,
        "status": job.status,
        "output": job.output,
        "created_at": rfc3339(job.created_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
        "url": f"{build_url}/jobs/{job.name}",
        "build": build,
    }


async def list_for(
    conn: asyncpg.Connection, build_id: int, name: str | None = None, status: str | None = None
) -> list[Job]:
    """A build's jobs in execution order, filtered by name substring and status (§7.8)."""
    rows = await conn.fetch(
        """
        SELECT j.id, j.build_id, s.name AS stage, j.name, j.commands, j.status, j.output,
               j.created_at, j.started_at, j.finished_at
        FROM build_jobs j JOIN build_stages s ON s.id = j.stage_id
        WHERE j.build_id = $1
          AND ($2::text IS NULL OR strpos(lower(j.name), lower($2)) > 0)
          AND ($3::text IS NULL OR j.status = $3
               OR ($3 = 'passed' AND j.status = 'passed_with_failures'))
        ORDER BY s.position, j.position
        """,
        build_id,
        name,
        status,
    )
    return [Job(**row) for row in rows]


async def get_by_name(conn: asyncpg.Connection, build_id: int, name: str) -> Job | None:
    row = await conn.fetchrow(
        """
        SELECT j.id, j.build_id, s.name AS stage, j.name, j.commands, j.status, j.output,
               j.created_at, j.started_at, j.finished_at
        FROM build_jobs j JOIN build_stages s ON s.id = j.stage_id
        WHERE j.build_id = $1 AND j.name = $2
        """,
        build_id,
        name,
    )
    return Job(**row) if row else None


async def output_since(
    conn: asyncpg.Connection, job_id: int, offset: int
) -> tuple[list[tuple[int, str]], int]:
    """Live output chunks of the job's current attempt from byte `offset` (chunks that start
    before it are cut); returns [(chunk start, text)] and the total length so far."""
    rows = await conn.fetch(
        """
        SELECT o.byte_offset, o.text FROM build_job_output o
        JOIN build_jobs j ON j.id = o.job_id JOIN builds b ON b.id = j.build_id
        WHERE o.job_id = $1 AND o.attempt = b.attempt
          AND o.byte_offset + octet_length(o.text) > $2
        ORDER BY o.byte_offset
        """,
        job_id,
        offset,
    )
    chunks = []
    for row in rows:
        start, text = row["byte_offset"], row["text"]
        if start < offset:
            raw = text.encode()
            cut = output.char_boundary(raw, offset - start)
            start, text = start + cut, raw[cut:].decode()
        chunks.append((start, text))
    total = await conn.fetchval(
        """
        SELECT coalesce(max(o.byte_offset + octet_length(o.text)), 0) FROM build_job_output o
        JOIN build_jobs j ON j.id = o.job_id JOIN builds b ON b.id = j.build_id
        WHERE o.job_id = $1 AND o.attempt = b.attempt
        """,
        job_id,
    )
    return chunks, int(total)
