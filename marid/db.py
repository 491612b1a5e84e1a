"""PostgreSQL access: the asyncpg pool and the migration runner."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"  # package data (marid/migrations)
# Any fixed number works; it only has to be the same for every `marid migrate`.
MIGRATE_LOCK = 0x6D61726964  # "marid"


async def create_pool(dsn: str, size: int = 10) -> asyncpg.Pool:
    """A connection pool; connections use UTC so timestamps come back timezone-aware."""
    pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=size, server_settings={"timezone": "UTC"}
    )
    assert pool is not None
    return pool


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
