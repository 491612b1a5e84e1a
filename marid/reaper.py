"""Removing what dead processes left behind (docs/architecture.md §6.1): the API's reaper and
the parts the runner's (runner/reaper.py) shares with it.

Nothing younger than the grace period (`reaper.grace`, docs/configuration.md §1.3) is ever
removed, and never a file a live process holds (marid.blobs.hold: a lock the kernel drops
when its process dies, kill -9 included). The API's reaper removes, at start and every
`reaper.interval`:

- upload spool files (marid/uploads.py) in this host's temporary directory;
- the blob store's unfinished uploads (`BlobStore.remove_partial`);
- orphan blobs: written before the grace period, referenced by no row at two sweeps in a
  row. Content is written before the row naming it commits (docs/architecture.md §6.1), so a
  young blob may be about to be referenced: the grace period covers that. The second sweep
  covers S3, where a multipart upload's LastModified is when it started, so a long upload can
  look old the moment it completes.

A row references a blob through a column named `blob_key` or `…_blob_key`, in any table:
the reaper reads them from the schema each sweep, so a new one is never overlooked, and
finding none at all deletes nothing. A store (directory, or bucket and prefix) belongs to one
installation: blobs another database references look like orphans here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from marid.blobs import BlobStore, remove_unused_files
from marid.uploads import SPOOL

log = logging.getLogger(__name__)

RETRY_FIRST = 1.0  # seconds before the first retry of a failed sweep; doubles up to the interval


@dataclass
class Reaped:
    """What one sweep removed."""

    files: int = 0  # spool files and temporary files or directories
    partial: int = 0  # unfinished uploads in the blob store
    blobs: int = 0  # orphan blobs
    containers: int = 0
    volumes: int = 0

    def __bool__(self) -> bool:
        return any(dataclasses.astuple(self))

    def __str__(self) -> str:
        counts = dataclasses.asdict(self)
        return ", ".join(f"{count} {name}" for name, count in counts.items() if count)


class Reaper:
    """The API's reaper: this host's upload spool files and the blob store's leftovers."""

    def __init__(
        self, pool: asyncpg.Pool, store: BlobStore, grace: float, temp_dir: Path | None = None
    ) -> None:
        self.pool = pool
        self.store = store
        self.grace = timedelta(seconds=grace)
        self.temp_dir = temp_dir or Path(tempfile.gettempdir())
        self._suspects: set[str] = set()  # orphans seen by the previous sweep

    async def tick(self, now: datetime) -> Reaped:
        """One sweep at `now` (timezone-aware); returns what it removed."""
        before = now - self.grace
        files = await asyncio.to_thread(remove_unused_files, self.temp_dir, [SPOOL], before)
        reaped = Reaped(files=files, partial=await self.store.remove_partial(before))
        reaped.blobs = await self._orphans(before)
        if reaped:
            log.info("reaper removed %s", reaped)
        return reaped

    async def _orphans(self, before: datetime) -> int:
        """Delete the blobs that were orphans at the previous sweep and still are."""
        async with self.pool.acquire() as conn:
            columns = await blob_columns(conn)
        suspects: set[str] = set()
        deleted = 0
        async for batch in self.store.listing():
            old = [blob.key for blob in batch if blob.modified < before]
            if not old:
                continue
            async with self.pool.acquire() as conn:
                orphans = await unreferenced(conn, columns, old)
            for key in orphans:
                if key in self._suspects:
                    await self.store.delete(key)
                    deleted += 1
                else:
                    suspects.add(key)
        self._suspects = suspects
        return deleted


async def blob_columns(conn: asyncpg.Connection) -> list[tuple[str, str, str]]:
    """(schema, table, column) of every table column that holds blob keys; raises
    RuntimeError when there is none, as deleting blobs would then be a mistake."""
    rows = await conn.fetch(
        r"""
        SELECT c.table_schema, c.table_name, c.column_name
        FROM information_schema.columns c
        JOIN information_schema.tables t
          ON t.table_schema = c.table_schema AND t.table_name = c.table_name
        WHERE t.table_type = 'BASE TABLE'
          AND c.table_schema = ANY(current_schemas(false))
          AND (c.column_name = 'blob_key' OR c.column_name LIKE '%\_blob\_key')
        ORDER BY 1, 2, 3
        """
    )
    if not rows:
        raise RuntimeError("no column holds blob keys in this database: no blob is deleted")
    return [(row[0], row[1], row[2]) for row in rows]


async def unreferenced(
    conn: asyncpg.Connection, columns: list[tuple[str, str, str]], keys: list[str]
) -> list[str]:
    """Those of `keys` that no row has in any of `columns` (from `blob_columns`)."""
    # Identifiers from the catalogue (quoted), never input; the keys go in as $1.
    conditions = " AND ".join(
        _NOT_REFERENCED.format(table=f"{_ident(schema)}.{_ident(table)}", column=_ident(column))
        for schema, table, column in columns
    )
    rows = await conn.fetch(
        f"SELECT k.key FROM unnest($1::text[]) AS k(key) WHERE {conditions}",  # noqa: S608
        keys,
    )
    return [row[0] for row in rows]


_NOT_REFERENCED = "NOT EXISTS (SELECT 1 FROM {table} r WHERE r.{column} = k.key)"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def live_attempts(conn: asyncpg.Connection, build_ids: list[int]) -> set[tuple[int, int]]:
    """(build id, attempt) of those of `build_ids` that are `running` under a lease that has
    not expired by the database's clock, which sets and renews leases, or whose workspace is
    still kept (the SQL function workspace_kept, migrations/0022_build_restarts.sql)."""
    rows = await conn.fetch(
        """
        SELECT id, attempt FROM builds
        WHERE id = ANY($1::bigint[]) AND status = 'running' AND lease_expires_at > now()
        UNION
        SELECT k.build_id, k.attempt FROM kept_workspaces k
        WHERE k.build_id = ANY($1::bigint[]) AND workspace_kept(k)
        """,
        build_ids,
    )
    return {(row["id"], row["attempt"]) for row in rows}


async def kept_at(conn: asyncpg.Connection, place: str) -> tuple[set[str], set[str]]:
    """The locations of the workspaces kept at `place`: (still kept, no longer kept). Those no
    longer kept are forgotten here; the caller removes them."""
    rows = await conn.fetch(
        "SELECT location, workspace_kept(k) AS kept FROM kept_workspaces k WHERE place = $1",
        place,
    )
    gone = {row["location"] for row in rows if not row["kept"]}
    await conn.execute(
        "DELETE FROM kept_workspaces k"
        " WHERE place = $1 AND location = ANY($2) AND NOT workspace_kept(k)",
        place,
        list(gone),
    )
    return {row["location"] for row in rows if row["kept"]}, gone


async def forget_kept_volumes(conn: asyncpg.Connection) -> int:
    """Forget the docker workspaces that are no longer kept: the label sweep of any runner of
    their engine then finds their attempt no longer live, and removes them. Returns how many."""
    result = await conn.execute(
        "DELETE FROM kept_workspaces k WHERE driver = 'docker' AND NOT workspace_kept(k)"
    )
    return int(result.split()[-1])


async def longest_running_timeout(conn: asyncpg.Connection) -> float:
    """The largest time limit, in seconds, of the builds running now (0 when none is)."""
    longest = await conn.fetchval(
        "SELECT max(timeout_seconds) FROM builds WHERE status = 'running'"
    )
    return float(longest or 0)


async def repeat(
    tick: Callable[[datetime], Awaitable[object]],
    interval: float,
    stop: asyncio.Event,
    name: str,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Run `tick(clock())` now and every `interval` seconds until `stop` is set.

    A failing tick (database, blob store or engine away) is retried after 1 s, 2 s, 4 s …
    up to `interval`, logged once per outage, and never ends the loop (docs/configuration.md
    §1.3, `reaper`).
    """
    failures = 0
    while not stop.is_set():
        try:
            await tick(clock())
        except Exception as exc:
            failures += 1
            if failures == 1:
                log.warning("%s failed, retrying until it works: %s", name, _reason(exc))
            delay = min(interval, RETRY_FIRST * 2 ** min(failures - 1, 16))
        else:
            if failures:
                log.info("%s works again (failed %d times)", name, failures)
            failures = 0
            delay = interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
