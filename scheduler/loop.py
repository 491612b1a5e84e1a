"""The scheduler loop: due cron jobs -> builds (docs/api.md §11.2).

Each tick claims a batch of due cron jobs with FOR UPDATE SKIP LOCKED, so several schedulers
share the work, and in one transaction records their runs, submits their builds and moves
next_run on, each step one statement for the whole batch. A scheduler killed mid-batch rolls the
whole batch back; the unique (cron_id, scheduled_at) of cron_runs guarantees a run never makes a
second build.

Between ticks the loop sleeps until the earliest next_run; a request that writes an earlier one
NOTIFYs marid_crons, which wakes every scheduler (Alarm; the connection is marid/listen.py),
and the claims above still let only one of them fire it (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import asyncpg

from marid import builds, channels, crons, curator, db, manifest, namespaces, users, webhooks
from marid.blobs import open_store
from marid.builds import Build
from marid.config import Config
from marid.crons import Cron
from marid.listen import Listener
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
    resolver = _Resolver(ManifestLimits.from_config(config), config)
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
    """Queue `build.submitted` (docs/api.md §10.6) for the builds whose namespace wants it."""
    spaces = {build.namespace_id for build in made if build.namespace_id is not None}
    hooked = await webhooks.listening(conn, spaces, "build.submitted") if spaces else set()
    if hooked:  # the payload is the Build entity, its `pending` reason included (§7.1)
        made = await builds.with_pending(conn, made)
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
            parsed = resolver.manifest(cron.manifest, author)  # rule 17 for the author
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
    """One batch's manifests, each distinct (text, drivers its author may use) parsed once, and
    namespaces, each (author, reference) resolved once; a failure is kept and raised again for
    the next cron job."""

    limits: ManifestLimits
    config: Config  # the drivers each author may use (Config.drivers_for)
    manifests: dict[tuple[str, tuple[str, ...]], Manifest | ValidationError] = field(
        default_factory=dict
    )
    spaces: dict[tuple[int, str], Namespace | ValidationError] = field(default_factory=dict)

    def manifest(self, text: str, author: User) -> Manifest:
        drivers = self.config.drivers_for(author.username)
        key = (text, tuple(drivers))
        if key not in self.manifests:
            try:
                self.manifests[key] = manifest.parse(text, self.limits, drivers)
            except ValidationError as exc:
                self.manifests[key] = exc
        return _or_raise(self.manifests[key])

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


class Alarm:
    """When the loop looks at the cron jobs next: the earliest next_run it read, at most
    `cron.interval` away, brought forward by a NOTIFY on channels.CRONS (a request wrote an
    earlier next_run) or by the LISTEN connection coming (back) up (docs/architecture.md)."""

    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.clock = clock
        self.connections = 0  # how often the LISTEN connection came up
        self._ring = asyncio.Event()
        self._deadline: datetime | None = None  # while asleep: when it wakes unless rung
        self._soonest: datetime | None = None  # while awake: the earliest next_run notified

    @property
    def sleeping_until(self) -> datetime | None:
        """The planned end of the current sleep; None while awake or about to wake."""
        return None if self._ring.is_set() else self._deadline

    def notified(self, payload: str) -> None:
        """A NOTIFY on channels.CRONS, whose payload is the new next_run (marid/crons.py)."""
        try:
            when = datetime.fromisoformat(payload)
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            log.warning("%s: unreadable payload %r; looking now", channels.CRONS, payload)
            self.wake()
        else:
            self._wake_by(when)

    def connected(self) -> None:
        """The LISTEN connection came up: what was written before it is only in the table."""
        self.connections += 1
        self.wake()

    def wake(self) -> None:
        """Look at the table now."""
        self._wake_by(self.clock())

    def _wake_by(self, when: datetime) -> None:
        if self._deadline is None:  # awake: the table may have been read already
            self._soonest = when if self._soonest is None else min(self._soonest, when)
        elif when < self._deadline:
            self._ring.set()  # the loop reads the table again, then sleeps until the new run

    async def sleep(self, deadline: datetime, stop: asyncio.Event) -> None:
        """Until `deadline`, an earlier next_run notified since the last sleep, or `stop`."""
        if self._soonest is not None:
            deadline = min(deadline, self._soonest)
        self._deadline = deadline
        self._ring.clear()
        waiters = [asyncio.ensure_future(e.wait()) for e in (self._ring, stop)]
        try:
            timeout = max((deadline - self.clock()).total_seconds(), 0.0)
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            self._deadline = self._soonest = None


async def run(
    config: Config,
    stop: asyncio.Event,
    batch: int = BATCH,
    alarm: Alarm | None = None,
    pool: asyncpg.Pool | None = None,
) -> None:
    """Fire due cron jobs until `stop` is set: drain the backlog, then sleep until the earliest
    next_run, at most `cron.interval`. A cron job created or changed meanwhile wakes the loop
    through LISTEN (Alarm); while that connection is down, `cron.interval` bounds how late it
    fires. Without `pool` it opens its own once the database answers. Tests pass their own
    `alarm` (and its clock) to watch the loop sleep."""
    if pool is None:
        own = await db.open_pool(config.database.dsn, config.database.pool_size, stop)
        if own is None:
            return  # stopped while waiting for the database
        try:
            await _serve(config, own, stop, batch, alarm or Alarm())
        finally:
            await own.close()
    else:
        await _serve(config, pool, stop, batch, alarm or Alarm())


async def _serve(
    config: Config, pool: asyncpg.Pool, stop: asyncio.Event, batch: int, alarm: Alarm
) -> None:
    """The loop of `run`. A database or blob store outage never ends it: a failed pass is
    logged once per outage and tried again with capped backoff (marid/db.py `Outage`), and
    the LISTEN connection coming back wakes it at once."""
    blobs = open_store(config.storage)
    listener = Listener(config.database.dsn, channels.CRONS, alarm.notified, alarm.connected)
    listening = asyncio.create_task(listener.run(), name="cron LISTEN")
    listening.add_done_callback(lambda _: alarm.wake())  # to re-raise its failure below
    cleaned = 0.0  # when the artifact curator last ran (time.monotonic)
    outage = db.Outage("scheduler tick", log)
    try:
        while not stop.is_set():
            deadline = alarm.clock() + timedelta(seconds=config.cron.interval)
            try:
                while await tick(pool, alarm.clock(), batch, config) == batch:
                    if stop.is_set():
                        return
                if time.monotonic() - cleaned >= config.cron.interval:
                    # Artifact retention (docs/manifest.md §6.7) runs here too (DESIGN.md).
                    await curator.run(pool, blobs, config.artifacts.cleanup_threshold)
                    cleaned = time.monotonic()
                deadline = await _next_look(pool, deadline)
            except db.OUTAGE as exc:
                retry = alarm.clock() + timedelta(seconds=outage.failed(exc))
                deadline = min(deadline, retry)
            else:
                outage.worked()
                deaf = listener.deaf_wait(config.cron.interval)  # no NOTIFY missed for long
                deadline = min(deadline, alarm.clock() + timedelta(seconds=deaf))
            await alarm.sleep(deadline, stop)
            if listening.done():
                listening.result()  # a bug, not an outage: fail loudly
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        await blobs.close()


async def _next_look(pool: asyncpg.Pool, latest: datetime) -> datetime:
    """The earliest next_run, or `latest` if that is sooner."""
    async with pool.acquire() as conn:
        earliest = await conn.fetchval("SELECT min(next_run) FROM crons")
    return latest if earliest is None else min(earliest, latest)
