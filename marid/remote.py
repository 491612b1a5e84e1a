"""Runners on other machines (issue 15, docs/runners.md): enrolment tokens, registered runners
and the job token of each claimed attempt (migrations/0023_remote_runners.sql).

Three tokens, each shown once and stored as a SHA-256 digest:

- an *enrolment* token (`mre_…`), made by an administrator (`marid runner-token create`,
  POST /runner-tokens): any number of runners register with it until it is revoked or expires;
- a *runner* token (`mrr_…`), handed to one runner when it registers: it claims builds and
  says the runner is alive; revoking the runner (DELETE /runners/{id}) hands its builds back;
- a *job* token (`mrj_…`), handed out with each claim: it is good for that build's attempt
  alone, for every report and download of it, and dies when the attempt ends (the build's
  fence, marid/lifecycle.py).

Functions take `conn` first and open no transaction.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from marid import lifecycle, runners, webhooks
from marid.lifecycle import Claim
from marid.times import rfc3339
from marid.validation import Errors, ValidationError

ENROLMENT_PREFIX, RUNNER_PREFIX, JOB_PREFIX = "mre_", "mrr_", "mrj_"
DRIVER_TYPES = ("docker", "os", "ssh", "qemu")
MAX_LABELS, MAX_PLACES = 32, 16
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=/-]{0,62}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,99}$")
REVOKED = "runner revoked"  # why a revoked runner's builds were handed back


def _value(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# -- Enrolment tokens ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Enrolment:
    id: int
    name: str
    created_by: str | None  # the username; None: made on the command line (or user deleted)
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None


def enrolment_json(enrolment: Enrolment, api_url: str) -> dict[str, Any]:
    return {
        "id": enrolment.id,
        "name": enrolment.name,
        "created_by": enrolment.created_by,
        "created_at": rfc3339(enrolment.created_at),
        "expires_at": rfc3339(enrolment.expires_at),
        "last_used_at": rfc3339(enrolment.last_used_at),
        "url": f"{api_url}/runner-tokens/{enrolment.id}",
    }


def check_enrolment(name: Any, expires_in: Any, errors: Errors) -> None:
    """Field errors of a new enrolment token: `name` (1 to 255 characters) and `expires_in`
    (seconds, a positive number, or None for never)."""
    if name is not None and not isinstance(name, str):
        errors.add("name", "Name must be a string")
    elif name is None or not name.strip():
        errors.add("name", "Name field required")
    elif len(name) > 255:
        errors.add("name", "Name cannot be longer than 255 characters in length")
    if expires_in is not None and (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, int | float)
        or not 0 < expires_in <= 10 * 365 * 86400
    ):
        errors.add("expires_in", "Expires in must be a number of seconds up to ten years")


async def create_enrolment(
    conn: asyncpg.Connection, name: str, created_by: int | None, expires_in: float | None
) -> tuple[Enrolment, str]:
    """A new enrolment token; returns it with its value (the only time it is known)."""
    value = _value(ENROLMENT_PREFIX)
    row = await conn.fetchrow(
        """
        WITH e AS (
            INSERT INTO runner_enrolments (name, token_digest, created_by, expires_at)
            VALUES ($1, $2, $3, now() + make_interval(secs => $4))
            RETURNING *
        )
        SELECT e.id, e.name, u.username AS created_by, e.created_at, e.expires_at,
               e.last_used_at
        FROM e LEFT JOIN users u ON u.id = e.created_by
        """,
        name,
        digest(value),
        created_by,
        expires_in,
    )
    return Enrolment(**row), value


async def list_enrolments(conn: asyncpg.Connection) -> list[Enrolment]:
    rows = await conn.fetch(
        """
        SELECT e.id, e.name, u.username AS created_by, e.created_at, e.expires_at,
               e.last_used_at
        FROM runner_enrolments e LEFT JOIN users u ON u.id = e.created_by ORDER BY e.id
        """
    )
    return [Enrolment(**row) for row in rows]


async def delete_enrolment(conn: asyncpg.Connection, enrolment_id: int) -> bool:
    """Revoke an enrolment token: no runner registers with it any more (those that did keep
    their runner tokens). False when there is none."""
    result = await conn.execute("DELETE FROM runner_enrolments WHERE id = $1", enrolment_id)
    return bool(result == "DELETE 1")


async def enrolment_of(conn: asyncpg.Connection, value: str) -> int | None:
    """The id of the live enrolment token `value` (noting its use), else None."""
    if not value.startswith(ENROLMENT_PREFIX):
        return None
    found: int | None = await conn.fetchval(
        """
        UPDATE runner_enrolments SET last_used_at = now()
        WHERE token_digest = $1 AND (expires_at IS NULL OR expires_at > now())
        RETURNING id
        """,
        digest(value),
    )
    return found


# -- Registered runners -------------------------------------------------------------------------


@dataclass(frozen=True)
class Announcement:
    """What a runner says of itself when it registers and at each heartbeat."""

    name: str
    version: str
    hostname: str
    drivers: list[str]
    labels: list[str]
    parallelism: int
    places: list[str]
    max_running_per_user: int | None
    interval: float  # seconds between its heartbeats


def check_announcement(data: Any, errors: Errors) -> Announcement | None:
    """The announcement of a register or heartbeat body, or None with field errors."""
    if not isinstance(data, dict):
        errors.add("body", "Request body must be a JSON object")
        return None
    known = {
        "name",
        "version",
        "hostname",
        "drivers",
        "labels",
        "parallelism",
        "places",
        "max_running_per_user",
        "interval",
        "token",
    }
    for unknown in sorted(set(data) - known):
        errors.add(unknown, "Unknown field")
    name: Any = data.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        errors.add(
            "name",
            "Name must be 1 to 100 letters, digits and . _ - @ : starting with a letter or digit",
        )
    texts = {}
    for key in ("version", "hostname"):
        value = data.get(key, "")
        if not isinstance(value, str) or len(value) > 255:
            errors.add(key, f"{key.capitalize()} must be a string of at most 255 characters")
        texts[key] = value if isinstance(value, str) else ""
    drivers = _strings(data.get("drivers"), "drivers", errors, len(DRIVER_TYPES))
    for driver in drivers:
        if driver not in DRIVER_TYPES:
            errors.add("drivers", f"Unknown driver type {driver!r}")
    labels = _strings(data.get("labels", []), "labels", errors, MAX_LABELS)
    for label in labels:
        if not LABEL.match(label):
            errors.add("labels", f"Invalid label {label!r}")
    places = _strings(data.get("places", []), "places", errors, MAX_PLACES)
    if any(len(place) > 512 for place in places):
        errors.add("places", "A place is at most 512 characters")
    parallelism: Any = data.get("parallelism")
    if not _int(parallelism) or not 1 <= parallelism <= 1000:
        errors.add("parallelism", "Parallelism must be an integer from 1 to 1000")
    limit = data.get("max_running_per_user")
    if limit is not None and (not _int(limit) or limit < 1):
        errors.add("max_running_per_user", "Max running per user must be a positive integer")
    interval = data.get("interval", runners.INTERVAL)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not 0.1 <= interval <= 3600
    ):
        errors.add("interval", "Interval must be a number of seconds from 0.1 to 3600")
    if errors.by_field:
        return None
    return Announcement(
        name,
        texts["version"],
        texts["hostname"],
        drivers,
        labels,
        parallelism,
        places,
        limit,
        float(interval),
    )


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value: Any, key: str, errors: Errors, most: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        errors.add(key, f"{key.capitalize()} must be a list of strings")
        return []
    if len(value) > most:
        errors.add(key, f"{key.capitalize()} has at most {most} entries")
    return list(dict.fromkeys(value))


@dataclass(frozen=True)
class Runner:
    """A runner as GET /runners lists it: registered (`remote`) or in the database's reach."""

    id: int
    name: str
    remote: bool
    version: str
    hostname: str
    drivers: list[str]
    labels: list[str]
    parallelism: int
    places: list[str]
    started_at: datetime
    last_seen_at: datetime
    alive: bool
    revoked_at: datetime | None
    address: str | None
    running: int  # builds it holds now


def runner_json(runner: Runner, api_url: str) -> dict[str, Any]:
    return {
        "id": runner.id,
        "name": runner.name,
        "remote": runner.remote,
        "version": runner.version,
        "hostname": runner.hostname,
        "drivers": runner.drivers,
        "labels": runner.labels,
        "capacity": runner.parallelism,
        "running": runner.running,
        "started_at": rfc3339(runner.started_at),
        "last_seen_at": rfc3339(runner.last_seen_at),
        "alive": runner.alive,
        "revoked_at": rfc3339(runner.revoked_at),
        "address": runner.address,
        "url": f"{api_url}/runners/{runner.id}",
    }


async def list_runners(conn: asyncpg.Connection) -> list[Runner]:
    rows = await conn.fetch(
        """
        SELECT r.id, r.name, r.token_digest IS NOT NULL AS remote, r.version, r.hostname,
               r.drivers, r.labels, r.parallelism, r.places, r.started_at, r.last_seen_at,
               runner_alive(r) AS alive, r.revoked_at, r.address,
               (SELECT count(*) FROM builds b
                WHERE b.runner = r.name AND b.status = 'running')::int AS running
        FROM runners r ORDER BY r.name
        """
    )
    return [Runner(**row) for row in rows]


@dataclass(frozen=True)
class Registered:
    """The runner a runner token names."""

    id: int
    name: str
    revoked: bool
    stale_blobs: list[str] = field(default_factory=list)  # register: delete after commit


async def register(
    conn: asyncpg.Connection,
    enrolment_id: int,
    said: Announcement,
    address: str | None,
    max_attempts: int,
    api_url: str = "",
) -> tuple[Registered, str]:
    """Register a runner; returns it and its runner token. A name an in-process runner that is
    alive holds is refused (ValidationError); a registered runner of the same name is replaced,
    its builds handed back (their content to delete after commit in `stale_blobs`), since a
    runner registers again when it restarts. The caller owns the transaction."""
    old = await conn.fetchrow(
        "SELECT id, token_digest, runner_alive(r) AS alive FROM runners r WHERE name = $1"
        " FOR UPDATE",
        said.name,
    )
    if old is not None and old["token_digest"] is None and old["alive"]:
        raise ValidationError({"name": ["A runner of this name is running in-process"]})
    stale: list[str] = []
    if old is not None:
        reason = f"runner {said.name} registered again"
        stale = (await hand_back(conn, said.name, reason, max_attempts, api_url)).stale_blobs
        await conn.execute("DELETE FROM runners WHERE id = $1", old["id"])
    value = _value(RUNNER_PREFIX)
    await runners.announce(
        conn,
        said.name,
        said.drivers,
        said.parallelism,
        said.interval,
        author_limit=said.max_running_per_user,
        places=said.places,
        version=said.version,
        hostname=said.hostname,
        pid=0,
    )
    runner_id = await conn.fetchval(
        """
        UPDATE runners SET token_digest = $2, enrolment_id = $3, labels = $4, address = $5
        WHERE name = $1 RETURNING id
        """,
        said.name,
        digest(value),
        enrolment_id,
        said.labels,
        address,
    )
    return Registered(runner_id, said.name, False, stale), value


async def runner_of(conn: asyncpg.Connection, value: str) -> Registered | None:
    """The runner whose token is `value` (revoked ones too: they are told so), else None."""
    if not value.startswith(RUNNER_PREFIX):
        return None
    row = await conn.fetchrow(
        "SELECT id, name, revoked_at IS NOT NULL AS revoked FROM runners WHERE token_digest = $1",
        digest(value),
    )
    return Registered(**row) if row else None


async def heartbeat(
    conn: asyncpg.Connection, runner: Registered, said: Announcement, address: str | None
) -> None:
    """The runner is alive and says `said` of itself (its name stays the registered one)."""
    await conn.execute(
        """
        UPDATE runners SET drivers = $2, parallelism = $3, version = $4, hostname = $5,
            announce_interval = $6, last_seen_at = now(), max_running_per_user = $7,
            places = $8, labels = $9, address = $10
        WHERE id = $1 AND revoked_at IS NULL
        """,
        runner.id,
        said.drivers,
        said.parallelism,
        said.version,
        said.hostname,
        said.interval,
        said.max_running_per_user,
        said.places,
        said.labels,
        address,
    )


async def seen(conn: asyncpg.Connection, runner: Registered, address: str | None) -> None:
    """The runner asked for work: it is alive."""
    await conn.execute(
        "UPDATE runners SET last_seen_at = now(), address = $2 WHERE id = $1"
        " AND revoked_at IS NULL",
        runner.id,
        address,
    )


async def withdraw(conn: asyncpg.Connection, runner: Registered) -> None:
    """The runner stops: its row and token go (it registers again when it starts)."""
    await conn.execute("DELETE FROM runners WHERE id = $1 AND revoked_at IS NULL", runner.id)


@dataclass(frozen=True)
class HandedBack:
    builds: list[int]  # the builds whose attempts were ended
    stale_blobs: list[str]  # their attempts' artifact content: delete after commit


async def revoke(
    conn: asyncpg.Connection, runner_id: int, max_attempts: int, api_url: str = ""
) -> HandedBack | None:
    """Revoke a registered runner: its token is refused from now on, and the builds it holds
    are handed back (a new attempt, or `failed` on the last; lifecycle.attempt_failed), so its
    jobs end at its next renewal. None when there is no such registered runner (an in-process
    runner has no token to revoke). The caller owns the transaction."""
    name = await conn.fetchval(
        """
        UPDATE runners SET revoked_at = coalesce(revoked_at, now())
        WHERE id = $1 AND token_digest IS NOT NULL RETURNING name
        """,
        runner_id,
    )
    if name is None:
        return None
    return await hand_back(conn, name, REVOKED, max_attempts, api_url)


async def hand_back(
    conn: asyncpg.Connection, name: str, reason: str, max_attempts: int, api_url: str = ""
) -> HandedBack:
    """End the attempts of the builds runner `name` holds for `reason` (a new attempt, or
    `failed` on the last, or `killed` when a kill was asked): its writes are fenced out from
    now on. The builds that ended send `build.finished` (on commit)."""
    rows = await conn.fetch(
        "SELECT id, attempt FROM builds WHERE runner = $1 AND status = 'running' FOR UPDATE",
        name,
    )
    stale: list[str] = []
    for row in rows:
        over = await lifecycle.attempt_failed(
            conn, Claim(row["id"], row["attempt"]), reason, max_attempts, 0.0
        )
        stale.extend(over.stale_blobs)
        if not over.retried:
            await webhooks.emit_build(conn, row["id"], "build.finished", api_url)
    return HandedBack([row["id"] for row in rows], stale)


# -- Job tokens ---------------------------------------------------------------------------------


async def issue_job_token(conn: asyncpg.Connection, claim: Claim) -> str:
    """The job token of the attempt `claim`, made now (an earlier attempt's stops working)."""
    value = _value(JOB_PREFIX)
    await conn.execute(
        "UPDATE builds SET job_token_digest = $2 WHERE id = $1 AND attempt = $3",
        claim.build_id,
        digest(value),
        claim.attempt,
    )
    return value


async def claim_of(conn: asyncpg.Connection, build_id: int, value: str) -> Claim | None:
    """The attempt the job token `value` is good for, if it is build `build_id`'s running
    attempt; else None (another build's token, or its attempt ended)."""
    if not value.startswith(JOB_PREFIX):
        return None
    attempt = await conn.fetchval(
        """
        SELECT attempt FROM builds
        WHERE id = $1 AND job_token_digest = $2 AND status = 'running'
        """,
        build_id,
        digest(value),
    )
    return None if attempt is None else Claim(build_id, attempt)
