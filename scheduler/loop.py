"""The scheduler loop: due cron jobs -> builds (API.md §11.2, issue 5).

Each tick claims a batch of due cron jobs with FOR UPDATE SKIP LOCKED, so several schedulers
share the work, and in one transaction records each run, submits its build and moves next_run on.
A scheduler killed mid-batch rolls the whole batch back; the unique (cron_id, scheduled_at) of
cron_runs guarantees a run never makes a second build.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

import asyncpg

from marid import builds, crons, curator, db, manifest, namespaces, users
from marid.blobs import open_store
from marid.config import Config
from marid.crons import Cron
from marid.manifest import ManifestLimits
from marid.submit import Submission, submit
from marid.validation import Errors, ValidationError

log = logging.getLogger(__name__)

BATCH = 500
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def comment_time(when: datetime) -> str:
    """`Sat Mar 2 00:00:00 2024` in UTC, whatever the locale (§11.2)."""
    t = when.astimezone(UTC)
    return f"{DAYS[t.weekday()]} {MONTHS[t.month - 1]} {t.day} {t:%H:%M:%S} {t.year}"


def tag_of(cron: Cron) -> str:
    return "cron:" + cron.name.replace(" ", "-")


async def tick(pool: asyncpg.Pool, now: datetime, batch: int, config: Config) -> int:
    """Fire up to `batch` due cron jobs in one transaction; returns how many were claimed
    (builds made or not), so a caller drains the backlog while it equals `batch`."""
    limits = ManifestLimits.from_config(config)
    async with pool.acquire() as conn, conn.transaction():
        due = await crons.claim_due(conn, now, batch)
        # Each build locks its owner's number counter until commit: taking them in one order
        # keeps concurrent schedulers from deadlocking on them.
        for cron in sorted(due, key=lambda c: (c.user_id, c.id)):
            if await crons.record_run(conn, cron):
                await _fire(conn, cron, limits, config.drivers)
            await crons.advance(conn, cron, now)
    return len(due)


async def _fire(
    conn: asyncpg.Connection, cron: Cron, limits: ManifestLimits, drivers: list[str]
) -> None:
    """Submit the cron job's build in a savepoint; a build that cannot be created (driver
    disabled, namespace no longer usable) is logged and skipped (§11.2)."""
    try:
        async with conn.transaction():
            sub = await _submission(conn, cron, limits, drivers)
            build = await submit(conn, sub)
            # Added here, not through Submission.tags: `:` is no character of a tag a client
            # may send (API.md §7.1), yet §11.2 names the cron tag `cron:<name>`.
            await builds.add_tags_by(conn, build.id, sub.author, [tag_of(cron)])
            await crons.link_build(conn, cron, build.id)
    except ValidationError as exc:
        log.info("cron %d (%s): no build: %s", cron.id, cron.name, exc.errors)
    else:
        log.info("cron %d (%s): build %d queued", cron.id, cron.name, build.id)


async def _submission(
    conn: asyncpg.Connection, cron: Cron, limits: ManifestLimits, drivers: list[str]
) -> Submission:
    people = await users.by_ids(conn, {cron.user_id, cron.author_id})
    author = people[cron.author_id]
    parsed = manifest.parse(cron.manifest, limits, drivers)  # raises ManifestError
    errors = Errors()
    ns = await namespaces.resolve(conn, author, parsed.namespace, errors, "manifest", True)
    errors.raise_if_any()
    owner = ns.owner if ns else author
    return Submission(
        author=author,
        owner=owner,
        namespace=ns,
        manifest=parsed,
        comment=f"{cron.name}: Scheduled build, next run {comment_time(cron.next_run)}",
        trigger_type="schedule",
        trigger_data={
            "email": people[cron.user_id].email,
            "username": people[cron.user_id].username,
        },
    )


async def run(config: Config, stop: asyncio.Event, batch: int = BATCH) -> None:
    """Fire due cron jobs until `stop` is set: drain the backlog, then sleep until the earliest
    next_run, at most `cron.interval` (which also bounds how late a cron job created or
    changed meanwhile fires)."""
    pool = await db.create_pool(config.database.dsn, config.database.pool_size)
    blobs = open_store(config.storage)
    cleaned = 0.0  # when the artifact curator last ran (time.monotonic)
    try:
        while not stop.is_set():
            wait = config.cron.interval
            try:
                while await tick(pool, datetime.now(UTC), batch, config) == batch:
                    if stop.is_set():
                        return
                if time.monotonic() - cleaned >= config.cron.interval:
                    # Artifact retention (MANIFEST.md §6.7) runs here too (DESIGN.md).
                    await curator.run(pool, blobs, config.artifacts.cleanup_threshold)
                    cleaned = time.monotonic()
                wait = await _until_next(pool, wait)
            except (OSError, asyncpg.PostgresError):
                log.exception("scheduler tick failed; retrying after cron.interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
    finally:
        await blobs.close()
        await pool.close()


async def _until_next(pool: asyncpg.Pool, interval: float) -> float:
    """Seconds until the earliest next_run, between 0 and `interval`."""
    async with pool.acquire() as conn:
        earliest = await conn.fetchval("SELECT min(next_run) FROM crons")
    if earliest is None:
        return interval
    return min(max((earliest - datetime.now(UTC)).total_seconds(), 0.0), interval)
