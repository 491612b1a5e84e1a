"""PostgreSQL as the build queue (DESIGN.md): claim, lease, recovery, fenced finishing.

A runner claims a queued build with FOR UPDATE SKIP LOCKED, which increments its `attempt`;
every later write by that runner names the attempt, so once a build has been recovered from
a runner that vanished, that runner's late writes change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from marid.submit import QUEUE_CHANNEL

KILL_CHANNEL = "marid_kill"
# NOTIFY'd, payload the new next_run (ISO 8601), when a request writes a cron job's next_run;
# schedulers LISTEN so that it fires on time the first time (docs/architecture.md).
CRON_CHANNEL = "marid_crons"


@dataclass(frozen=True)
class Claim:
    build_id: int
    attempt: int


async def claim(
    conn: asyncpg.Connection, runner: str, drivers: list[str], lease: float
) -> Claim | None:
    """Take the oldest queued build for one of `drivers`, or None when there is none."""
    row = await conn.fetchrow(
        """
        UPDATE builds
        SET status = 'running', started_at = now(), attempt = attempt + 1, runner = $1,
            lease_expires_at = now() + make_interval(secs => $3)
        WHERE id = (
            SELECT id FROM builds
            WHERE status = 'queued' AND driver = ANY($2::text[])
            ORDER BY created_at, id
            LIMIT 1
            FOR UPDATE SKIP LOCKED
        )
        RETURNING id, attempt
        """,
        runner,
        drivers,
        lease,
    )
    return Claim(row["id"], row["attempt"]) if row else None


async def renew(conn: asyncpg.Connection, claim: Claim, lease: float) -> bool | None:
    """Extend the lease. Returns whether a kill was requested, or None if the lease is lost."""
    result = await conn.fetchval(
        """
        UPDATE builds SET lease_expires_at = now() + make_interval(secs => $3)
        WHERE id = $1 AND attempt = $2 AND status = 'running'
        RETURNING kill_requested
        """,
        claim.build_id,
        claim.attempt,
        lease,
    )
    return bool(result) if result is not None else None


@dataclass(frozen=True)
class Recovered:
    build_ids: list[int]
    killed: list[int]  # kill requested before the runner vanished: ended `killed` here
    stale_blobs: list[str]  # artifact content of the dead attempts: delete after commit


async def recover_expired(conn: asyncpg.Connection) -> Recovered:
    """Requeue builds whose runner's lease ran out (docs/manifest.md §6.13); a build whose kill
    was requested ends `killed` instead. The caller owns the transaction."""
    rows = await conn.fetch(
        """
        SELECT id, user_id, kill_requested FROM builds
        WHERE status = 'running' AND lease_expires_at < now()
        FOR UPDATE SKIP LOCKED
        """
    )
    requeued: list[int] = []
    killed: list[int] = []
    stale: list[str] = []
    for row in rows:
        if row["kill_requested"]:
            await finish_killed(conn, row["id"])
            killed.append(row["id"])
            continue
        stale += await _reset(conn, row["id"], row["user_id"])
        requeued.append(row["id"])
    if requeued:
        await conn.execute("SELECT pg_notify($1, 'recovered')", QUEUE_CHANNEL)
    return Recovered(requeued, killed, stale)


async def _reset(conn: asyncpg.Connection, build_id: int, owner_id: int) -> list[str]:
    """Put a build back in the queue as if it had never run; returns its stale blob keys."""
    await conn.execute(
        """
        UPDATE builds SET status = 'queued', started_at = NULL, finished_at = NULL,
            output = NULL, runner = NULL, lease_expires_at = NULL
        WHERE id = $1
        """,
        build_id,
    )
    await conn.execute(
        """
        UPDATE build_jobs SET status = 'queued', output = NULL, started_at = NULL,
            finished_at = NULL
        WHERE build_id = $1
        """,
        build_id,
    )
    await conn.execute(
        "DELETE FROM build_job_output o USING build_jobs j"
        " WHERE o.job_id = j.id AND j.build_id = $1",
        build_id,
    )
    await conn.execute("UPDATE build_objects SET placed = false WHERE build_id = $1", build_id)
    stale = await conn.fetch(
        """
        WITH old AS (
            SELECT id, blob_key FROM build_artifacts
            WHERE build_id = $1 AND blob_key IS NOT NULL FOR UPDATE
        )
        UPDATE build_artifacts a SET blob_key = NULL, size = NULL, md5 = NULL, sha256 = NULL
        FROM old WHERE a.id = old.id
        RETURNING old.blob_key
        """,
        build_id,
    )
    await conn.execute(
        """
        INSERT INTO build_tags (build_id, name, user_id) VALUES ($1, 'orphaned', $2)
        ON CONFLICT DO NOTHING
        """,
        build_id,
        owner_id,
    )
    return [row["blob_key"] for row in stale]


async def finish_killed(conn: asyncpg.Connection, build_id: int) -> None:
    """End a build and its unfinished jobs `killed` (its runner is gone)."""
    await conn.execute(
        """
        UPDATE build_jobs SET status = 'killed', finished_at = now()
        WHERE build_id = $1 AND status IN ('queued', 'running')
        """,
        build_id,
    )
    await conn.execute(
        """
        UPDATE builds SET status = 'killed', finished_at = now(), lease_expires_at = NULL,
            output = (SELECT string_agg(coalesce(j.output, ''), '' ORDER BY s.position, j.position)
                      FROM build_jobs j JOIN build_stages s ON s.id = j.stage_id
                      WHERE j.build_id = $1)
        WHERE id = $1
        """,
        build_id,
    )
