"""The scheduler loop: due cron jobs -> builds (API.md §11.2, issue 5).

Each tick claims a batch of due cron jobs with FOR UPDATE SKIP LOCKED, so several schedulers
share the work, and in one transaction records their runs, submits their builds and moves
next_run on, each step one statement for the whole batch. A scheduler killed mid-batch rolls the
whole batch back; the unique (cron_id, scheduled_at) of cron_runs guarantees a run never makes a
second build.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg

from marid import builds, crons, curator, db, manifest, namespaces, users, webhooks
from marid.blobs import open_store
from marid.builds import Build
from marid.config import Config
from marid.crons import Cron
from marid.manifest import Manifest, ManifestLimits
from marid.namespaces import Namespace
from marid.submit import Submission, submit_many
from marid.users import User
from marid.validation import Errors, ValidationError

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    resolver = _Resolver(ManifestLimits.from_config(config), config.drivers)
    async with pool.acquire() as conn, conn.transaction():
        due = await crons.claim_due(conn, now, batch)
        if not due:
            return 0
        fired = await crons.record_runs(conn, due)
        await crons.advance(conn, due, now)
        firing = await _submissions(conn, fired, resolver)
        # Every owner's build counter stays locked until commit: submit_many takes them after
        # all its reads and in owner order, so concurrent schedulers hold them briefly and
        # never deadlock on them.
        made = await submit_many(conn, [sub for _, sub in firing])
        runs = [(cron, build.id) for (cron, _), build in zip(firing, made, strict=True)]
        await crons.link_builds(conn, runs)
        await _announce(conn, firing, made, config.server.api_url)
    for cron, build_id in runs:
        log.info("cron %d (%s): build %d queued", cron.id, cron.name, build_id)
    return len(due)


async def _announce(
    conn: asyncpg.Connection,
    firing: list[tuple[Cron, Submission]],
    made: list[Build],
    api_url: str,
) -> None:
    """Queue `build.submitted` (API.md §10.6) for the builds whose namespace wants it."""
    spaces = {build.namespace_id for build in made if build.namespace_id is not None}
    hooked = await webhooks.listening(conn, spaces, "build.submitted") if spaces else set()
    for (_, sub), build in zip(firing, made, strict=True):
        if build.namespace_id in hooked:
            body = builds.to_json(build, sub.owner, sub.namespace, api_url)
            await webhooks.emit(conn, build.namespace_id, "build.submitted", body)


async def _submissions(
    conn: asyncpg.Connection, fired: list[Cron], resolver: _Resolver
) -> list[tuple[Cron, Submission]]:
    """The build of each fired cron job, by owner then cron id (the order of their numbers).
    One that cannot be created (driver disabled, namespace no longer usable) is logged and left
    out, its run still recorded and its next_run still moved on (§11.2)."""
    people = await users.by_ids(conn, {c.user_id for c in fired} | {c.author_id for c in fired})
    firing = []
    for cron in sorted(fired, key=lambda c: (c.user_id, c.id)):
        author = people[cron.author_id]
        try:
            parsed = resolver.manifest(cron.manifest)
            ns = await resolver.namespace(conn, author, parsed.namespace)
        except ValidationError as exc:  # ManifestError included
            log.info("cron %d (%s): no build: %s", cron.id, cron.name, exc.errors)
            continue
        owner = people[cron.user_id]
        sub = Submission(
            author=author,
            owner=ns.owner if ns else author,
            namespace=ns,
            manifest=parsed,
            comment=f"{cron.name}: Scheduled build, next run {comment_time(cron.next_run)}",
            trigger_type="schedule",
            trigger_data={"email": owner.email, "username": owner.username},
            system_tags=(tag_of(cron),),
            cron_id=cron.id,
        )
        firing.append((cron, sub))
    return firing


@dataclass
class _Resolver:
    """One batch's manifests, each distinct text parsed once, and namespaces, each (author,
    reference) resolved once; a failure is kept and raised again for the next cron job."""

    limits: ManifestLimits
    drivers: list[str]
    manifests: dict[str, Manifest | ValidationError] = field(default_factory=dict)
    spaces: dict[tuple[int, str], Namespace | ValidationError] = field(default_factory=dict)

    def manifest(self, text: str) -> Manifest:
        if text not in self.manifests:
            try:
                self.manifests[text] = manifest.parse(text, self.limits, self.drivers)
            except ValidationError as exc:
                self.manifests[text] = exc
        return _or_raise(self.manifests[text])

    async def namespace(
        self, conn: asyncpg.Connection, author: User, reference: str | None
    ) -> Namespace | None:
        if not reference:
            return None
        if (author.id, reference) not in self.spaces:
            errors = Errors()
            ns = await namespaces.resolve(conn, author, reference, errors, "manifest", True)
            self.spaces[author.id, reference] = ns or ValidationError(errors.by_field)
        return _or_raise(self.spaces[author.id, reference])


def _or_raise(outcome: T | ValidationError) -> T:
    if isinstance(outcome, ValidationError):
        raise outcome
    return outcome


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
