"""Submitting a build: numbering, its plan and its snapshot (MANIFEST.md §5, API.md §7.4).

Everything runs in the caller's transaction; the NOTIFY that wakes runners is delivered
only when it commits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import asyncpg

from marid import builds, keys, manifest, variables
from marid.builds import Build
from marid.manifest import Manifest
from marid.namespaces import Namespace
from marid.users import User

QUEUE_CHANNEL = "marid_builds"


@dataclass(frozen=True)
class Submission:
    author: User  # who submitted (the cron's author for scheduled builds)
    owner: User  # the namespace owner, or the author without a namespace
    namespace: Namespace | None
    manifest: Manifest
    comment: str = ""
    tags: tuple[str, ...] = ()
    trigger_type: str = "manual"
    trigger_data: dict[str, str] | None = None


async def submit(conn: asyncpg.Connection, sub: Submission) -> Build:
    """Create the queued build of `sub` with its stages, jobs, artifacts and snapshot."""
    number = await conn.fetchval(
        """
        INSERT INTO build_counters (user_id, last_number) VALUES ($1, 1)
        ON CONFLICT (user_id) DO UPDATE SET last_number = build_counters.last_number + 1
        RETURNING last_number
        """,
        sub.owner.id,
    )
    m = sub.manifest
    data = sub.trigger_data or {"email": sub.author.email, "username": sub.author.username}
    build_id = await conn.fetchval(
        """
        INSERT INTO builds (user_id, author_id, namespace_id, number, manifest, driver,
                            trigger_type, trigger_comment, trigger_data, timeout_seconds,
                            resources)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
        RETURNING id
        """,
        sub.owner.id,
        sub.author.id,
        sub.namespace.id if sub.namespace else None,
        number,
        m.text,
        m.driver.type,
        sub.trigger_type,
        sub.comment,
        json.dumps(data),
        m.timeout,
        json.dumps(
            {"memory": m.resources.memory, "cpus": m.resources.cpus, "pids": m.resources.pids}
        ),
    )
    await _plan(conn, build_id, sub.owner, manifest.plan(m, number))
    await _snapshot(conn, build_id, sub)
    await builds.add_tags_by(conn, build_id, sub.author, builds.normalise_tags(list(sub.tags)))
    await conn.execute("SELECT pg_notify($1, $2)", QUEUE_CHANNEL, m.driver.type)
    build = await builds.get(conn, build_id)
    assert build is not None
    return build


async def _plan(conn: asyncpg.Connection, build_id: int, owner: User, plan: manifest.Plan) -> None:
    job_ids: dict[str, int] = {}
    for position, stage in enumerate(plan.stages):
        stage_id = await conn.fetchval(
            """
            INSERT INTO build_stages (build_id, name, allow_failures, position)
            VALUES ($1, $2, $3, $4) RETURNING id
            """,
            build_id,
            stage.name,
            stage.allow_failures,
            position,
        )
        for job_position, job in enumerate(stage.jobs):
            job_ids[job.name] = await conn.fetchval(
                """
                INSERT INTO build_jobs (build_id, stage_id, name, commands, position,
                                        timeout_seconds, artifacts)
                VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id
                """,
                build_id,
                stage_id,
                job.name,
                job.commands,
                job_position,
                job.timeout,
                json.dumps([list(pair) for pair in job.artifacts]),
            )
    await conn.executemany(
        """
        INSERT INTO build_artifacts (build_id, user_id, job_id, source, name)
        VALUES ($1, $2, $3, $4, $5)
        """,
        [(build_id, owner.id, job_ids[a.job], a.source, a.name) for a in plan.artifacts],
    )


async def _snapshot(conn: asyncpg.Connection, build_id: int, sub: Submission) -> None:
    """Freeze variables, keys and objects as they are now (MANIFEST.md §5.5)."""
    # Personal resources count only when the submitter is the owner.
    personal = sub.author.id == sub.owner.id
    ns_id = sub.namespace.id if sub.namespace else None
    final: dict[str, tuple[int | None, str | None, bytes | None, bool]] = {}
    for var in await variables.for_build(conn, sub.owner.id, ns_id, personal):
        final.pop(var.key, None)  # a later entry wins, and takes the later position
        final[var.key] = (var.id, var.value, var.value_sealed, var.masked)
    for key, value in sub.manifest.env:
        final.pop(key, None)
        final[key] = (None, value, None, False)
    await conn.executemany(
        """
        INSERT INTO build_variables
            (build_id, variable_id, key, value, value_sealed, masked, position)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        """,
        [
            (build_id, var_id, key, value, sealed, masked, position)
            for position, (key, (var_id, value, sealed, masked)) in enumerate(final.items())
        ],
    )
    await conn.executemany(
        """
        INSERT INTO build_keys (build_id, key_id, name, key_sealed, config, location)
        VALUES ($1, $2, $3, $4, $5, $6)
        """,
        [
            (build_id, key.id, key.name, key.key_sealed, key.config, f"/root/.ssh/{key.name}")
            for key in await keys.for_build(conn, sub.owner.id, ns_id, personal)
        ],
    )
    for source, destination in sub.manifest.objects:
        object_id = await conn.fetchval(
            """
            SELECT id FROM objects
            WHERE name = $1 AND (namespace_id = $2
                                 OR ($3 AND user_id = $4 AND namespace_id IS NULL))
            ORDER BY namespace_id IS NULL, detached, id DESC LIMIT 1
            """,
            source,
            ns_id,
            personal,
            sub.owner.id,
        )
        await conn.execute(
            "INSERT INTO build_objects (build_id, object_id, source, name) VALUES ($1, $2, $3, $4)",
            build_id,
            object_id,
            source,
            destination,
        )
