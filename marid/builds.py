"""Builds: the entity, listings with build filters, tags and pins (docs/api.md §7). A build's
state transitions, kills included, are marid/lifecycle.py's."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from marid import jobs, namespaces, runners, users
from marid.blobs import BlobStore
from marid.jobs import Excerpt
from marid.namespaces import Namespace
from marid.times import rfc3339
from marid.users import User

STATUSES = ("queued", "running", "passed", "passed_with_failures", "failed", "killed", "timed_out")
FINAL = frozenset(STATUSES[2:])
LINKS = ("objects", "variables", "jobs", "artifacts", "tags")
# Tag names: Unicode letters, ASCII digits, - _ . / (docs/api.md §7.1).
_TAG_CHAR = re.compile(r"[0-9\-_./]|[^\W\d_]")


# Why a queued build has not started (docs/api.md §7.1), from what the alive runners offer
# and what holds the build back (the SQL function build_holds, migrations/0020_build_limits.sql).
NO_RUNNER = "no runner is running"
NOT_OFFERED = "no runner offers driver {driver}"
RETRY = "waiting to retry after a failed attempt, from {time}"
IMAGE = "image being loaded: {name}"
WORKSPACE = "no runner reaches the workspace it resumes from"
NAMESPACE_LIMIT = "namespace limit of {limit} running builds reached"
USER_LIMIT = "user limit of {limit} running builds reached"
WAITING = "waiting for a runner slot ({ahead} ahead)"


@dataclass(frozen=True)
class Pending:
    """Why a queued build has not started yet (docs/api.md §7.1): `reason` for people, and
    `position`, its place in the queue of its driver type (1: a runner with room takes it
    next), counting the builds before it that nothing holds back."""

    reason: str
    position: int


@dataclass(frozen=True)
class Hold:
    """A queued build's place in its queue and what holds it back, if anything (one row of
    the SQL function build_holds)."""

    hold: str | None  # retry, workspace, image, namespace, user; None: nothing
    detail: str | None  # the retry time, the image's name or the limit
    ahead: int  # queued builds of its driver before it that nothing holds back


@dataclass(frozen=True)
class Build:
    id: int
    user_id: int
    author_id: int
    namespace_id: int | None
    number: int
    manifest: str
    driver: str
    status: str
    # The jobs' outputs in execution order as (job name, excerpt), composed when read
    # (`with_outputs`; docs/api.md §7.1): None until the build has ended, and for one that
    # never started. `builds.output` itself is no longer written (migration 0014).
    output: list[tuple[str, Excerpt | None]] | None
    pinned: bool
    trigger_type: str
    trigger_comment: str
    trigger_data: dict[str, str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    tags: list[str]
    attempts: int = 0  # runs started, retries included (docs/manifest.md §6.13)
    pending: Pending | None = None  # queued builds only, once read (`with_pending`)
    restart_of: int | None = None  # the number of the build this one restarts (same owner)


def from_row(row: asyncpg.Record) -> Build:
    data = dict(row)
    data["trigger_data"] = json.loads(data["trigger_data"])
    data["tags"] = list(data["tags"])
    data["output"] = None  # see `with_outputs`
    return Build(**data)


async def with_outputs(
    conn: asyncpg.Connection, found: list[Build], blobs: BlobStore | None
) -> list[Build]:
    """`found` with their outputs, each job's bounded as in its Job entity (docs/api.md
    §7.1); without `blobs`, an output in the blob store shows only the line naming it."""
    ended = {b.id for b in found if b.status in FINAL and b.started_at is not None}
    if not ended:
        return found
    by_build = await jobs.of_builds(conn, list(ended), blobs)
    return [
        dataclasses.replace(b, output=[(j.name, j.output) for j in by_build.get(b.id, [])])
        if b.id in ended
        else b
        for b in found
    ]


def pending(offer: runners.Offer, driver: str, hold: Hold) -> Pending:
    """Why a queued build for `driver` waits, given what the alive runners offer and what
    holds it back."""
    position = hold.ahead + 1
    if not offer.runners:
        return Pending(NO_RUNNER, position)
    if driver not in offer.drivers:
        return Pending(NOT_OFFERED.format(driver=driver), position)
    if hold.hold == "retry":
        return Pending(RETRY.format(time=hold.detail), position)
    if hold.hold == "workspace":
        return Pending(WORKSPACE, position)
    if hold.hold == "image":
        return Pending(IMAGE.format(name=hold.detail), position)
    if hold.hold == "namespace":
        return Pending(NAMESPACE_LIMIT.format(limit=hold.detail), position)
    if hold.hold == "user":
        return Pending(USER_LIMIT.format(limit=hold.detail), position)
    return Pending(WAITING.format(ahead=hold.ahead), position)


async def holds(
    conn: asyncpg.Connection, ids: list[int], author_limit: int | None
) -> dict[int, Hold]:
    """What holds back each of the queued builds `ids`, with their places (one query over the
    whole queue: a build's place counts the builds of its driver before it)."""
    rows = await conn.fetch(
        """
        SELECT * FROM (
            SELECT b.id, h.hold, h.detail,
                   count(*) FILTER (WHERE h.hold IS NULL) OVER (
                       PARTITION BY b.driver ORDER BY b.created_at, b.id
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS ahead
            FROM builds b JOIN build_holds($2) h ON h.build_id = b.id
        ) q WHERE q.id = ANY($1::bigint[])
        """,
        ids,
        author_limit,
    )
    return {row["id"]: Hold(row["hold"], row["detail"], row["ahead"]) for row in rows}


async def with_pending(conn: asyncpg.Connection, found: list[Build]) -> list[Build]:
    """`found` with each queued build's `pending` reason: two queries for all of them, none
    when no build is queued."""
    queued = [b.id for b in found if b.status == "queued"]
    if not queued:
        return found
    offer = await runners.offered(conn)
    held = await holds(conn, queued, offer.author_limit)
    nothing = Hold(None, None, 0)  # started since it was read
    return [
        dataclasses.replace(b, pending=pending(offer, b.driver, held.get(b.id, nothing)))
        if b.status == "queued"
        else b
        for b in found
    ]


async def complete(
    conn: asyncpg.Connection, found: list[Build], blobs: BlobStore | None
) -> list[Build]:
    """`found` as entities show them: with outputs (`with_outputs`) and pending reasons."""
    return await with_pending(conn, await with_outputs(conn, found, blobs))


async def _one(
    conn: asyncpg.Connection, row: asyncpg.Record | None, blobs: BlobStore | None
) -> Build | None:
    return (await complete(conn, [from_row(row)], blobs))[0] if row else None


def output_text(build: Build, build_url: str) -> str | None:
    """The build's `output` field: its jobs' excerpts joined in execution order."""
    if build.output is None:
        return None
    return "".join(
        excerpt.render(f"{build_url}/jobs/{jobs.url_segment(name)}/output")
        for name, excerpt in build.output
        if excerpt is not None
    )


def valid_tag(name: str) -> bool:
    return bool(name) and all(_TAG_CHAR.fullmatch(char) for char in name)


def normalise_tags(names: list[str]) -> list[str]:
    """Valid names, duplicates collapsed, in first-seen order; invalid ones dropped silently."""
    return list(dict.fromkeys(name for name in names if valid_tag(name)))


@dataclass(frozen=True)
class Filters:
    """The build filters of docs/api.md §1.8 (page is handled by the caller)."""

    tag: str | None = None
    search: str | None = None
    status: str | None = None
    pinned: bool = False


@dataclass(frozen=True)
class Listing:
    """Which builds a listing covers: every field set narrows it (the web interface filters
    a user's builds by namespace with `visible_to` and `namespace_id`)."""

    visible_to: int | None = None  # "my" builds of docs/api.md §3.3 for this user id
    namespace_id: int | None = None  # builds in this exact namespace (§8.8)
    object_id: int | None = None  # builds that declared this object (§14.5)
    cron_id: int | None = None  # builds submitted by this cron job (§11.7)


@dataclass(frozen=True)
class Viewer:
    """Who reads a build listing. A listing keeps only the builds this caller could read one by
    one (`GET /b/:username/:number`, docs/api.md §7.2): the builds of a cron job or object can
    sit in other namespaces than it, or in none, and a namespace's visibility can change after
    the fact (issue 11 row 3)."""

    user_id: int | None  # None: anonymous
    may_read: bool  # holds build:read; without it only builds in public namespaces (§2.4)


def url(build: Build, owner: User, api_url: str) -> str:
    return f"{api_url}/b/{owner.username}/{build.number}"


def to_json(
    build: Build, owner: User, ns: Namespace | None, api_url: str, embed_namespace: bool = True
) -> dict[str, Any]:
    """The Build entity of docs/api.md §7.1."""
    base = url(build, owner, api_url)
    return {
        "id": build.id,
        "user_id": build.user_id,
        "namespace_id": build.namespace_id,
        "number": build.number,
        "manifest": build.manifest,
        "status": build.status,
        "output": output_text(build, base),
        "tags": build.tags,
        "pinned": build.pinned,
        "attempts": build.attempts,
        "pending": (
            {"reason": build.pending.reason, "position": build.pending.position}
            if build.pending
            else None
        ),
        "restarted_from": (
            f"{api_url}/b/{owner.username}/{build.restart_of}" if build.restart_of else None
        ),
        "created_at": rfc3339(build.created_at),
        "started_at": rfc3339(build.started_at),
        "finished_at": rfc3339(build.finished_at),
        "url": base,
        **{f"{link}_url": f"{base}/{link}" for link in LINKS},
        "user": users.to_json(owner),
        "namespace": namespaces.to_json(ns, api_url) if ns and embed_namespace else None,
        "trigger": {
            "type": build.trigger_type,
            "comment": build.trigger_comment,
            "data": build.trigger_data,
        },
    }


async def many_to_json(
    conn: asyncpg.Connection, found: list[Build], api_url: str
) -> list[dict[str, Any]]:
    """Build entities with owners and namespaces batch-loaded."""
    owners = await users.by_ids(conn, {b.user_id for b in found})
    spaces = await namespaces.by_ids(conn, {b.namespace_id for b in found if b.namespace_id})
    return [to_json(b, owners[b.user_id], spaces.get(b.namespace_id or 0), api_url) for b in found]


async def get(
    conn: asyncpg.Connection, build_id: int, blobs: BlobStore | None = None
) -> Build | None:
    """The build with its output and pending reason (`complete`)."""
    row = await conn.fetchrow("SELECT * FROM build_rows WHERE id = $1", build_id)
    return await _one(conn, row, blobs)


async def get_by_number(
    conn: asyncpg.Connection, username: str, number: int, blobs: BlobStore | None = None
) -> Build | None:
    """The build with its output and pending reason (`complete`)."""
    row = await conn.fetchrow(
        """
        SELECT b.* FROM build_rows b JOIN users u ON u.id = b.user_id
        WHERE u.username = $1 AND b.number = $2
        """,
        username,
        number,
    )
    return await _one(conn, row, blobs)


async def count(
    conn: asyncpg.Connection, listing: Listing, filters: Filters, viewer: Viewer
) -> int:
    """How many builds of `listing` that `viewer` may read match `filters`."""
    return int(
        await conn.fetchval(
            """
            SELECT count(*) FROM build_rows b LEFT JOIN namespaces n ON n.id = b.namespace_id
            WHERE ($1::bigint IS NULL
                   OR (b.namespace_id IS NULL AND b.user_id = $1)
                   OR b.namespace_id IN (SELECT namespace_id FROM namespace_members
                                         WHERE user_id = $1))
              AND ($2::bigint IS NULL OR b.namespace_id = $2)
              AND ($3::bigint IS NULL
                   OR b.id IN (SELECT build_id FROM build_objects WHERE object_id = $3))
              AND build_matches(b, $4, $5, $6, $7)
              AND ($8::bigint IS NULL OR b.id IN (SELECT id FROM builds WHERE cron_id = $8))
              AND (n.visibility = 'public'
                   OR $10::boolean AND ((b.namespace_id IS NULL AND b.user_id = $9)
                                        OR (n.visibility = 'internal' AND $9::bigint IS NOT NULL)
                                        OR b.namespace_id IN (SELECT namespace_id
                                                              FROM namespace_members
                                                              WHERE user_id = $9)))
            """,
            listing.visible_to,
            listing.namespace_id,
            listing.object_id,
            filters.tag,
            filters.search,
            filters.status,
            filters.pinned,
            listing.cron_id,
            viewer.user_id,
            viewer.may_read,
        )
    )


async def page(
    conn: asyncpg.Connection,
    listing: Listing,
    filters: Filters,
    viewer: Viewer,
    offset: int,
    limit: int,
    blobs: BlobStore | None = None,
) -> list[Build]:
    """One page of the builds of `listing` that `viewer` may read matching `filters`, newest
    first (docs/api.md §7.3)."""
    rows = await conn.fetch(
        """
        SELECT b.* FROM build_rows b LEFT JOIN namespaces n ON n.id = b.namespace_id
        WHERE ($1::bigint IS NULL
               OR (b.namespace_id IS NULL AND b.user_id = $1)
               OR b.namespace_id IN (SELECT namespace_id FROM namespace_members
                                     WHERE user_id = $1))
          AND ($2::bigint IS NULL OR b.namespace_id = $2)
          AND ($3::bigint IS NULL
               OR b.id IN (SELECT build_id FROM build_objects WHERE object_id = $3))
          AND build_matches(b, $4, $5, $6, $7)
          AND ($10::bigint IS NULL OR b.id IN (SELECT id FROM builds WHERE cron_id = $10))
          AND (n.visibility = 'public'
               OR $12::boolean AND ((b.namespace_id IS NULL AND b.user_id = $11)
                                    OR (n.visibility = 'internal' AND $11::bigint IS NOT NULL)
                                    OR b.namespace_id IN (SELECT namespace_id
                                                          FROM namespace_members
                                                          WHERE user_id = $11)))
        ORDER BY b.created_at DESC, b.id DESC
        OFFSET $8 LIMIT $9
        """,
        listing.visible_to,
        listing.namespace_id,
        listing.object_id,
        filters.tag,
        filters.search,
        filters.status,
        filters.pinned,
        offset,
        limit,
        listing.cron_id,
        viewer.user_id,
        viewer.may_read,
    )
    return await complete(conn, [from_row(row) for row in rows], blobs)


@dataclass(frozen=True)
class Tag:
    build_id: int
    name: str
    user_id: int
    created_at: datetime


async def tags(conn: asyncpg.Connection, build: Build) -> list[Tag]:
    rows = await conn.fetch(
        """
        SELECT build_id, name, user_id, created_at FROM build_tags
        WHERE build_id = $1 ORDER BY convert_to(name, 'UTF8')
        """,
        build.id,
    )
    return [Tag(**row) for row in rows]


async def tag(conn: asyncpg.Connection, build: Build, name: str) -> Tag | None:
    row = await conn.fetchrow(
        "SELECT build_id, name, user_id, created_at FROM build_tags"
        " WHERE build_id = $1 AND name = $2",
        build.id,
        name,
    )
    return Tag(**row) if row else None


async def add_tags_by(
    conn: asyncpg.Connection, build_id: int, user: User, names: list[str]
) -> list[Tag]:
    """Add the names not yet on the build; returns only the newly added tags, by name."""
    rows = await conn.fetch(
        """
        INSERT INTO build_tags (build_id, name, user_id)
        SELECT $1, name, $3 FROM unnest($2::text[]) AS t(name)
        ON CONFLICT DO NOTHING
        RETURNING build_id, name, user_id, created_at
        """,
        build_id,
        names,
        user.id,
    )
    return sorted((Tag(**row) for row in rows), key=lambda t: t.name.encode())


async def delete_tag(conn: asyncpg.Connection, build: Build, name: str) -> bool:
    result = await conn.execute(
        "DELETE FROM build_tags WHERE build_id = $1 AND name = $2", build.id, name
    )
    return bool(result == "DELETE 1")


async def set_pinned(
    conn: asyncpg.Connection, build: Build, pinned: bool, blobs: BlobStore | None = None
) -> Build:
    await conn.execute("UPDATE builds SET pinned = $2 WHERE id = $1", build.id, pinned)
    updated = await get(conn, build.id, blobs)
    assert updated is not None
    return updated


async def latest_in(conn: asyncpg.Connection, namespace_id: int) -> Build | None:
    """The most recently created build of this exact namespace (docs/api.md §8.1, §8.7)."""
    row = await conn.fetchrow(
        """
        SELECT * FROM build_rows WHERE namespace_id = $1
        ORDER BY created_at DESC, id DESC LIMIT 1
        """,
        namespace_id,
    )
    return await _one(conn, row, None)


async def latest_by_namespace(conn: asyncpg.Connection, ids: list[int]) -> dict[int, Build]:
    """The latest build of each of these namespaces that has one."""
    rows = await conn.fetch(
        """
        SELECT DISTINCT ON (namespace_id) * FROM build_rows WHERE namespace_id = ANY($1)
        ORDER BY namespace_id, created_at DESC, id DESC
        """,
        ids,
    )
    found = await complete(conn, [from_row(row) for row in rows], None)
    return {build.namespace_id or 0: build for build in found}
