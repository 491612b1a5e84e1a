"""PostgreSQL access: the asyncpg pool, waiting for the database at start-up, logging an outage
once, and the migration runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"  # package data (marid/migrations)
# Any fixed number works; it only has to be the same for every `marid migrate`.
MIGRATE_LOCK = 0x6D61726964  # "marid"
T = TypeVar("T")

FIRST_RETRY = 0.5  # seconds before the first retry while the database is away, doubled each time
MAX_RETRY = 5.0  # so a process works again within 5 s of the database's return (issue 10)
CONNECT_TIMEOUT = 10.0
# What an absent database looks like when connecting: a refused or reset socket, a timeout, a
# host name that does not resolve yet, "the database system is starting up" (57P03), too many
# connections, class 08, a connection closed under us. A wrong password or database name is a
# configuration error, not an outage: it still ends the process.
ABSENT = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
)
# What a service loop retries (docs/architecture.md §1): ABSENT, any error the server sends
# (a query cancelled by a shutdown, a serialization failure), and asyncpg's "another operation
# is in progress" on a connection the server is closing. Anything else is a bug and ends it.
OUTAGE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresError,
    asyncpg.InternalClientError,
)


async def create_pool(dsn: str, size: int = 10, connect: bool = True) -> asyncpg.Pool:
    """A connection pool; connections use UTC so timestamps come back timezone-aware. It opens
    one connection at once, failing if the database is away, unless `connect` is false: then
    every connection is opened on first use."""
    pool = await asyncpg.create_pool(
        dsn, min_size=1 if connect else 0, max_size=size, server_settings={"timezone": "UTC"}
    )
    assert pool is not None
    return pool


async def open_pool(dsn: str, size: int, stop: asyncio.Event) -> asyncpg.Pool | None:
    """A pool, once the database answers; None when `stop` is set first (see `wait_for`).

    Its connections are opened on use (`create_pool(connect=False)`): a pool that keeps one
    open for its own sake has asyncpg log a traceback at each of its retries while the
    database is away.
    """
    pool = await create_pool(dsn, size, connect=False)
    if await wait_for(dsn, stop, lambda: _answers(pool)):
        return pool
    await pool.close()
    return None


async def _answers(pool: asyncpg.Pool) -> bool:
    async with pool.acquire() as conn:
        await conn.fetchval("SELECT 1")
    return True


async def wait_for(
    dsn: str,
    stop: asyncio.Event,
    connect: Callable[[], Awaitable[T]],
    first_retry: float = FIRST_RETRY,
    max_retry: float = MAX_RETRY,
) -> T | None:
    """What `connect()` returns once it stops failing for an absent database (ABSENT), retried
    with capped backoff; None as soon as `stop` is set (SIGTERM while waiting). Logs once:
    `waiting for the database at host:port/db: <reason>`, then `database available`. Any other
    error (a wrong password) is raised at once."""
    delay, waited = first_retry, False
    while not stop.is_set():
        try:
            value = await _unless(stop, asyncio.wait_for(connect(), CONNECT_TIMEOUT))
        except ABSENT as exc:
            if not waited:
                log.warning("waiting for the database at %s: %s", where(dsn), reason(exc))
                waited = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, max_retry)
            continue
        if value is None:
            break  # stopped while connecting
        if waited:
            log.info("database available")
        return value
    return None


async def _unless(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when `stop` is set first (`work` is then cancelled)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, *ABSENT):
        await task
    return None


def where(dsn: str) -> str:
    """`host:port/db` of a PostgreSQL URL, without the user or password, for log lines."""
    parts = urlsplit(dsn)
    try:
        port = parts.port or 5432
    except ValueError:
        port = 5432
    return f"{parts.hostname or 'localhost'}:{port}/{parts.path.lstrip('/') or '(default)'}"


def reason(exc: BaseException) -> str:
    """One line saying what a database error was."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Outage:
    """A service loop's outage (database or blob store away), logged once: a warning at its
    first error, a line when the loop works again (docs/architecture.md §1)."""

    def __init__(self, service: str, logger: logging.Logger) -> None:
        self.service = service
        self.log = logger
        self.failures = 0  # errors since the loop last worked

    def failed(self, exc: BaseException) -> float:
        """Note one failure; returns the seconds to wait before the next try (capped
        backoff)."""
        if not self.failures:
            self.log.warning("%s failed, retrying until it works: %s", self.service, reason(exc))
        self.failures += 1
        return min(FIRST_RETRY * 2 ** min(self.failures - 1, 16), MAX_RETRY)

    def worked(self) -> None:
        """Note a pass that worked; ends the outage, if any."""
        if self.failures:
            self.log.info("%s works again (failed %d times)", self.service, self.failures)
        self.failures = 0


def migration_files(directory: Path = MIGRATIONS) -> list[Path]:
    """The numbered `NNNN_name.sql` files in the order they are applied."""
    return sorted(p for p in directory.glob("[0-9][0-9][0-9][0-9]_*.sql"))


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS) -> list[str]:
    """Apply pending migrations, each in its own transaction; returns the names applied.

    An advisory lock serialises concurrent runs, so the second waits and then finds
    nothing to do.
    """
    files = migration_files(directory)
    if not files:  # never report "up to date" from an installation that lost its SQL files
        raise FileNotFoundError(f"no migrations in {directory}: this installation is incomplete")
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                name text PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        applied = []
        for path in files:
            if path.name in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text(encoding="utf-8"))
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", path.name)
            log.info("applied migration %s", path.name)
            applied.append(path.name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK)
