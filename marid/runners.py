"""Runners' presence: which runner processes are alive and which driver types they claim
(issue 12 part 3, the table `runners` of migrations/0018_runners.sql).

Each runner runs `run` beside its loop: it `announce`s itself at start and every `interval`
seconds, and `withdraw`s when it stops. A runner is alive while its last announcement is
younger than three of its intervals (the SQL function `runner_alive`); `offered` tells what
the alive runners offer, which a queued build's `pending` reason is made of (marid/builds.py,
docs/api.md §7.1). A runner's interval is a third of `runner.lease` (`interval_for`), so a
runner counts as alive for as long as its builds' leases would: one that died stops counting
when the builds it held are recovered. Rows of runners that died are deleted `FORGET_AFTER`
their last announcement by any runner's loop.

Functions take `conn` first and need no transaction; `run` takes the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import asyncpg

from marid import __version__, db

log = logging.getLogger(__name__)

ALIVE_INTERVALS = 3  # a runner is alive this many intervals after announcing (runner_alive)
FORGET_AFTER = 3600.0  # seconds after its last announcement that a dead runner's row is deleted
WITHDRAW_TIMEOUT = 5.0  # seconds a stopping runner gives its withdrawal (else its row goes stale)
INTERVAL = 10.0  # seconds: the interval of runner.lease's default, 30 s (`interval_for`)


def instance_of(dsn: str) -> str:
    """A stable name for the database an installation's runners serve (host, port, database;
    never the password): containers are labelled with it, as installations may share a Docker
    engine. A runner on another machine learns it when it registers (api/runner.py)."""
    parts = urlsplit(dsn)
    where = f"{parts.hostname}:{parts.port}{parts.path}"
    return hashlib.sha256(where.encode()).hexdigest()[:16]


def interval_for(lease: float) -> float:
    """The presence interval of a runner whose builds are leased for `lease` seconds: alive
    for one lease after each announcement."""
    return lease / ALIVE_INTERVALS


async def announce(
    conn: asyncpg.Connection,
    name: str,
    drivers: Sequence[str],
    parallelism: int,
    interval: float = INTERVAL,
    started_at: datetime | None = None,
    author_limit: int | None = None,
    places: Sequence[str] = (),
    version: str = __version__,
    hostname: str | None = None,
    pid: int | None = None,
) -> None:
    """Record that runner `name` is alive now, claims builds of `drivers`, up to `parallelism`
    at once, at most `author_limit` of one author's running (None: no limit), reaches the kept
    workspaces of `places` (docs/api.md §27), and announces again within `interval` seconds.
    `started_at` replaces the row's start time; None keeps it (or takes now for a new row).
    `version`, `hostname` and `pid` are this process's unless given (a registered runner's,
    announced by the API: marid/remote.py)."""
    await conn.execute(
        """
        INSERT INTO runners AS r (name, drivers, parallelism, version, hostname, pid,
                                  announce_interval, started_at, last_seen_at,
                                  max_running_per_user, places)
        VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now()), now(), $9, $10)
        ON CONFLICT (name) DO UPDATE
        SET drivers = excluded.drivers, parallelism = excluded.parallelism,
            version = excluded.version, hostname = excluded.hostname, pid = excluded.pid,
            announce_interval = excluded.announce_interval,
            started_at = coalesce($8, r.started_at), last_seen_at = now(),
            max_running_per_user = excluded.max_running_per_user, places = excluded.places
        """,
        name,
        list(drivers),
        parallelism,
        version,
        socket.gethostname() if hostname is None else hostname,
        os.getpid() if pid is None else pid,
        interval,
        started_at,
        author_limit,
        list(places),
    )


async def withdraw(conn: asyncpg.Connection, name: str) -> None:
    """Delete runner `name`'s row: it is stopping and claims nothing more."""
    await conn.execute("DELETE FROM runners WHERE name = $1", name)


async def forget(conn: asyncpg.Connection, after: float = FORGET_AFTER) -> int:
    """Delete the rows of runners that are not alive and last announced over `after` seconds
    ago; returns how many."""
    result = await conn.execute(
        """
        DELETE FROM runners r
        WHERE NOT runner_alive(r) AND r.last_seen_at < now() - make_interval(secs => $1)
        """,
        after,
    )
    return int(result.split()[-1])


@dataclass(frozen=True)
class Offer:
    """What the alive runners offer: how many there are, the driver types they claim, and
    the limit of one author's running builds they apply (`builds.max_running_per_user`):
    None when any of them applies none, else the largest, since a build is held back only
    when no runner would take it."""

    runners: int
    drivers: frozenset[str]
    author_limit: int | None = None


async def offered(conn: asyncpg.Connection) -> Offer:
    """What the runners alive now offer (one query)."""
    rows = await conn.fetch(
        "SELECT drivers, max_running_per_user FROM runners r WHERE runner_alive(r)"
    )
    limits = [row["max_running_per_user"] for row in rows]
    author_limit = None if not limits or None in limits else max(limits)
    return Offer(len(rows), frozenset(d for row in rows for d in row["drivers"]), author_limit)


async def run(
    pool: asyncpg.Pool,
    name: str,
    drivers: Sequence[str],
    parallelism: int,
    stop: asyncio.Event,
    interval: float,
    author_limit: int | None = None,
    places: Sequence[str] = (),
) -> None:
    """Announce runner `name` now and every `interval` seconds until `stop` is set, then
    withdraw it; cancelled, it withdraws too. Never raises: a failing announcement (database
    away) is logged once per outage and retried with capped backoff (marid/db.py `Outage`)."""
    started = datetime.now(UTC)
    outage = db.Outage(f"runner {name}: presence", log)
    try:
        while not stop.is_set():
            try:
                async with pool.acquire() as conn:
                    await announce(
                        conn, name, drivers, parallelism, interval, started, author_limit, places
                    )
                    await forget(conn)
            except Exception as exc:
                wait = min(outage.failed(exc), interval)
                if outage.failures == 1 and not isinstance(exc, db.OUTAGE):
                    log.error("runner %s: presence: unexpected error", name, exc_info=exc)
            else:
                outage.worked()
                wait = interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
    finally:
        await _withdraw(pool, name)


async def _withdraw(pool: asyncpg.Pool, name: str) -> None:
    """Withdraw `name`, giving up after WITHDRAW_TIMEOUT: its row then stops counting once
    stale."""
    try:
        async with asyncio.timeout(WITHDRAW_TIMEOUT), pool.acquire() as conn:
            await withdraw(conn, name)
    except Exception as exc:
        log.warning("runner %s: not withdrawn (%s); ignored once stale", name, db.reason(exc))
