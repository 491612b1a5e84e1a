"""Cron jobs: manifests submitted on a schedule (docs/api.md §11, docs/api.md §17).

The scheduler's side (claiming due cron jobs and recording their runs) is here too; the loop that
drives it is scheduler/loop.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from marid import channels, manifest, namespaces, schedules, users, yamltext
from marid.listing import Listing
from marid.manifest import Manifest, ManifestLimits
from marid.namespaces import Namespace
from marid.times import rfc3339
from marid.users import User
from marid.validation import Body, Errors, ValidationError


@dataclass(frozen=True)
class Cron:
    id: int
    user_id: int
    author_id: int
    namespace_id: int | None
    name: str
    schedule: str
    timezone: str
    manifest: str
    prev_run: datetime | None
    next_run: datetime
    created_at: datetime


@dataclass(frozen=True)
class CronForm:
    """A POST or PATCH /cron body after its shape checks (docs/api.md §11.5, §11.8); None = not
    given (or unusable: the error is in `errors`)."""

    name: str | None
    schedule: str | None  # normalised
    manifest: str | None
    timezone: str | None
    errors: Errors = field(repr=False)

    @classmethod
    def parse(cls, body: Body, creating: bool) -> CronForm:
        if creating:
            name = body.required_string("name", "Name")
            text = body.required_string("manifest", "Manifest")
        else:  # "" leaves name and manifest unchanged (§11.8)
            name = body.string("name", "Name") or None
            text = body.string("manifest", "Manifest") or None
            if text is not None and is_empty_manifest(text):
                text = None
        schedule = body.string("schedule", "Schedule")
        if schedule is not None:
            schedule = schedules.normalise(schedule)
            if not schedules.is_valid(schedule):
                body.errors.add("schedule", schedules.INVALID)
                schedule = None
        elif creating and not body.errors.has("schedule"):
            schedule = "daily"
        timezone = body.string("timezone", "Timezone")
        if timezone == "" or (timezone is None and creating and not body.errors.has("timezone")):
            timezone = "UTC"  # EXT a.2
        if timezone is not None and timezone not in schedules.known_timezones():
            body.errors.add("timezone", f"Timezone unknown time zone {timezone}")
            timezone = None
        return cls(name, schedule, text, timezone, body.errors)


def is_empty_manifest(text: str) -> bool:
    """Whether a PATCH manifest means "unchanged": a document with no value in it (§11.8).

    Djinn's own client sends the zero manifest its YAML library writes (`namespace: ""`,
    `driver: {}`, `jobs: []` …) on every update, and Djinn's form reads a manifest that marshals
    to `{}` as not given (cron/http/form.go); a document that does not load is not empty, so
    the manifest check reports it.
    """
    try:
        data = yamltext.load(text)
    except yamltext.LoadError:
        return False
    if data is None:
        return True
    return isinstance(data, dict) and all(value in (None, "", {}, []) for value in data.values())


async def check_manifest(
    conn: asyncpg.Connection, user: User, text: str, limits: ManifestLimits, errors: Errors
) -> tuple[Manifest | None, Namespace | None]:
    """The parsed manifest and its resolved namespace, errors added under `manifest`.

    Driver availability is not checked for a cron job (§11.5): the scheduler checks it when it
    fires. The caller owns the transaction (namespaces created on the way roll back with it).
    """
    try:
        parsed = manifest.parse(text, limits, None)
    except manifest.ManifestError as exc:
        ns_errors = Errors()
        await namespaces.resolve(conn, user, exc.namespace, ns_errors, "manifest", True)
        messages = ns_errors.by_field.get("manifest", [])
        for name, found in exc.with_namespace(messages).errors.items():  # `cache` too
            for message in found:
                errors.add(name, message)
        return None, None
    ns = await namespaces.resolve(conn, user, parsed.namespace, errors, "manifest", True)
    return parsed, ns


def _first_run(schedule: str, timezone: str, now: datetime, errors: Errors) -> datetime | None:
    when = schedules.next_run(schedule, timezone, now)
    if when is None:
        errors.add("schedule", schedules.NO_UPCOMING_RUN)
    return when


async def create(
    conn: asyncpg.Connection, user: User, form: CronForm, limits: ManifestLimits, now: datetime
) -> Cron:
    """Insert a cron job authored by `user`; raises ValidationError with every failed rule.
    The caller owns the transaction."""
    errors = form.errors
    ns = None
    if form.manifest is not None:
        _, ns = await check_manifest(conn, user, form.manifest, limits, errors)
    when = None
    if form.schedule is not None:
        when = _first_run(form.schedule, form.timezone or "UTC", now, errors)
    owner_id = ns.user_id if ns else user.id
    if form.name and not errors.has("manifest") and await _taken(conn, owner_id, ns, form.name):
        errors.add("name", "Name already exists")
    errors.raise_if_any()
    assert form.name and form.schedule and form.manifest and form.timezone and when
    cron = await _write(
        conn,
        """
        INSERT INTO crons (user_id, author_id, namespace_id, name, schedule, timezone, manifest,
                           next_run)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        RETURNING id, user_id, author_id, namespace_id, name, schedule, timezone, manifest,
                  prev_run, next_run, created_at
        """,
        owner_id,
        user.id,
        ns.id if ns else None,
        form.name,
        form.schedule,
        form.timezone,
        form.manifest,
        when,
    )
    await _wake_schedulers(conn, cron.next_run)
    return cron


def may_change(cron: Cron, user: User) -> bool:
    """Only its author changes a cron job (docs/api.md §11.3): its builds run with the author's
    rights, so a manifest someone else wrote must never run with them (issue 11 row 2)."""
    return cron.author_id == user.id


def may_delete(cron: Cron, user: User) -> bool:
    """Its author, or the owner of its namespace (who need not keep a collaborator's cron job
    firing in their namespace), deletes a cron job (docs/api.md §11.3)."""
    return cron.author_id == user.id or (cron.namespace_id is not None and cron.user_id == user.id)


async def update(
    conn: asyncpg.Connection,
    user: User,
    cron: Cron,
    form: CronForm,
    limits: ManifestLimits,
    now: datetime,
) -> Cron:
    """Apply a PATCH (§11.8): the manifest's namespace is re-resolved and `next_run`
    recomputed from `now` when the schedule or time zone changes (the schedulers are told).
    The caller owns the transaction."""
    errors = form.errors
    user_id, namespace_id = cron.user_id, cron.namespace_id
    if form.manifest is not None:
        _, ns = await check_manifest(conn, user, form.manifest, limits, errors)
        user_id, namespace_id = (ns.user_id, ns.id) if ns else (user.id, None)
    schedule = form.schedule or cron.schedule
    timezone = form.timezone or cron.timezone
    when = cron.next_run
    if (schedule, timezone) != (cron.schedule, cron.timezone) and not errors.has("schedule"):
        when = _first_run(schedule, timezone, now, errors) or when
    name = form.name or cron.name
    if not errors.has("manifest") and await _taken(conn, user_id, namespace_id, name, cron.id):
        errors.add("name", "Name already exists")
    errors.raise_if_any()
    updated = await _write(
        conn,
        """
        UPDATE crons SET user_id = $2, namespace_id = $3, name = $4, schedule = $5,
                         timezone = $6, manifest = $7, next_run = $8
        WHERE id = $1
        RETURNING id, user_id, author_id, namespace_id, name, schedule, timezone, manifest,
                  prev_run, next_run, created_at
        """,
        cron.id,
        user_id,
        namespace_id,
        name,
        schedule,
        timezone,
        form.manifest or cron.manifest,
        when,
    )
    if updated.next_run != cron.next_run:
        await _wake_schedulers(conn, updated.next_run)
    return updated


async def _wake_schedulers(conn: asyncpg.Connection, next_run: datetime) -> None:
    """Tell the schedulers of a new or moved next_run, so that a sleeping one wakes for it
    rather than up to `cron.interval` late (docs/architecture.md). NOTIFY is delivered on
    commit: a rolled-back write wakes nobody."""
    await conn.execute("SELECT pg_notify($1, $2)", channels.CRONS, next_run.isoformat())


async def _write(conn: asyncpg.Connection, sql: str, *args: Any) -> Cron:
    try:
        row = await conn.fetchrow(sql, *args)
    except asyncpg.UniqueViolationError as exc:  # a concurrent request took the name
        if exc.constraint_name in ("crons_user_id_name_key", "crons_namespace_id_name_key"):
            raise ValidationError({"name": ["Name already exists"]}) from exc
        raise
    return Cron(**row)


async def _taken(
    conn: asyncpg.Connection,
    owner_id: int,
    ns: Namespace | int | None,
    name: str,
    except_id: int = 0,
) -> bool:
    """Whether the name is in use, checked before writing so that the error is reported with
    the others; the unique indexes still decide a race."""
    ns_id = ns.id if isinstance(ns, Namespace) else ns
    return bool(
        await conn.fetchval(
            """
            SELECT EXISTS (
                SELECT 1 FROM crons WHERE name = $3 AND id <> $4 AND CASE
                    WHEN $2::bigint IS NULL THEN user_id = $1 AND namespace_id IS NULL
                    ELSE namespace_id = $2 END
            )
            """,
            owner_id,
            ns_id,
            name,
            except_id,
        )
    )


async def get(conn: asyncpg.Connection, cron_id: int) -> Cron | None:
    row = await conn.fetchrow(
        """
        SELECT id, user_id, author_id, namespace_id, name, schedule, timezone, manifest,
               prev_run, next_run, created_at
        FROM crons WHERE id = $1
        """,
        cron_id,
    )
    return Cron(**row) if row else None


async def delete(conn: asyncpg.Connection, cron: Cron) -> None:
    """Delete the cron job; the builds it created are kept (§11.9)."""
    await conn.execute("DELETE FROM crons WHERE id = $1", cron.id)


async def count(conn: asyncpg.Connection, listing: Listing, search: str) -> int:
    """How many cron jobs of `listing` have a name containing `search`."""
    return int(
        await conn.fetchval(
            """
            SELECT count(*) FROM crons c
            WHERE ($1::bigint IS NULL
                   OR (c.namespace_id IS NULL AND c.user_id = $1)
                   OR c.namespace_id IN (SELECT namespace_id FROM namespace_members
                                         WHERE user_id = $1))
              AND ($2::bigint IS NULL OR c.namespace_id = $2)
              AND strpos(lower(c.name), lower($3)) > 0
            """,
            listing.visible_to,
            listing.namespace_id,
            search,
        )
    )


async def page(
    conn: asyncpg.Connection, listing: Listing, search: str, offset: int, limit: int
) -> list[Cron]:
    """One page of the cron jobs of `listing` (docs/api.md §11.4) whose name contains `search`, by
    name."""
    rows = await conn.fetch(
        """
        SELECT id, user_id, author_id, namespace_id, name, schedule, timezone, manifest,
               prev_run, next_run, created_at
        FROM crons c
        WHERE ($1::bigint IS NULL
               OR (c.namespace_id IS NULL AND c.user_id = $1)
               OR c.namespace_id IN (SELECT namespace_id FROM namespace_members
                                     WHERE user_id = $1))
          AND ($2::bigint IS NULL OR c.namespace_id = $2)
          AND strpos(lower(c.name), lower($3)) > 0
        ORDER BY c.name, c.id
        OFFSET $4 LIMIT $5
        """,
        listing.visible_to,
        listing.namespace_id,
        search,
        offset,
        limit,
    )
    return [Cron(**row) for row in rows]


async def to_json(
    conn: asyncpg.Connection, found: list[Cron], api_url: str
) -> list[dict[str, Any]]:
    """Cron entities (docs/api.md §11.1 with EXT a's `timezone`)."""
    people = await users.by_ids(conn, {c.user_id for c in found} | {c.author_id for c in found})
    spaces = await namespaces.by_ids(conn, {c.namespace_id for c in found if c.namespace_id})
    return [
        {
            "id": c.id,
            "author_id": c.author_id,
            "user_id": c.user_id,
            "namespace_id": c.namespace_id,
            "name": c.name,
            "schedule": c.schedule,
            "manifest": c.manifest,
            "prev_run": rfc3339(c.prev_run),
            "next_run": rfc3339(c.next_run),
            "created_at": rfc3339(c.created_at),
            "url": f"{api_url}/cron/{c.id}",
            "author": users.to_json(people[c.author_id]),
            "user": users.to_json(people[c.user_id]),
            "namespace": (
                namespaces.to_json(spaces[c.namespace_id], api_url) if c.namespace_id else None
            ),
            "timezone": c.timezone,
        }
        for c in found
    ]


def now() -> datetime:
    """The reference time of a request (§11.2)."""
    return datetime.now(UTC)


async def claim_due(conn: asyncpg.Connection, now: datetime, limit: int) -> list[Cron]:
    """Lock up to `limit` due cron jobs no other scheduler holds, earliest first. The caller
    owns the transaction: the locks last until it ends."""
    rows = await conn.fetch(
        """
        SELECT id, user_id, author_id, namespace_id, name, schedule, timezone, manifest,
               prev_run, next_run, created_at
        FROM crons WHERE next_run <= $1
        ORDER BY next_run, id
        LIMIT $2
        FOR UPDATE SKIP LOCKED
        """,
        now,
        limit,
    )
    return [Cron(**row) for row in rows]


async def record_runs(conn: asyncpg.Connection, due: list[Cron]) -> list[Cron]:
    """Record that the runs due at each cron job's `next_run` fire; returns the cron jobs whose
    run had not fired yet. The unique (cron_id, scheduled_at) makes a run fire once whatever
    the locks did (docs/architecture.md)."""
    rows = await conn.fetch(
        """
        INSERT INTO cron_runs (cron_id, scheduled_at)
        SELECT * FROM unnest($1::bigint[], $2::timestamptz[])
        ON CONFLICT ON CONSTRAINT cron_runs_cron_id_scheduled_at_key DO NOTHING
        RETURNING cron_id
        """,
        [cron.id for cron in due],
        [cron.next_run for cron in due],
    )
    fired = {row["cron_id"] for row in rows}
    return [cron for cron in due if cron.id in fired]


async def link_builds(conn: asyncpg.Connection, made: list[tuple[Cron, int]]) -> None:
    """Record each (cron job, build id) as the build of the cron job's current run. The build's
    own `cron_id` (§11.7) is set when it is submitted (Submission.cron_id)."""
    await conn.execute(
        """
        UPDATE cron_runs r SET build_id = m.build_id
        FROM unnest($1::bigint[], $2::timestamptz[], $3::bigint[])
             AS m(cron_id, scheduled_at, build_id)
        WHERE r.cron_id = m.cron_id AND r.scheduled_at = m.scheduled_at
        """,
        [cron.id for cron, _ in made],
        [cron.next_run for cron, _ in made],
        [build_id for _, build_id in made],
    )


async def advance(conn: asyncpg.Connection, due: list[Cron], now: datetime) -> None:
    """Set prev_run = now and next_run from now (§11.2) for each cron job: missed runs are not
    replayed."""
    after: dict[tuple[str, str], datetime] = {}  # one croniter walk per distinct schedule
    for cron in due:
        if (cron.schedule, cron.timezone) not in after:
            when = schedules.next_run(cron.schedule, cron.timezone, now)
            # A schedule accepted on creation always has a run within 5 years of then; one
            # with none left from `now` is looked at again after the horizon rather than never.
            after[cron.schedule, cron.timezone] = when or now + schedules.HORIZON
    await conn.execute(
        """
        UPDATE crons c SET prev_run = $2, next_run = n.next_run
        FROM unnest($1::bigint[], $3::timestamptz[]) AS n(id, next_run)
        WHERE c.id = n.id
        """,
        [cron.id for cron in due],
        now,
        [after[cron.schedule, cron.timezone] for cron in due],
    )
