"""Build caches on the runner (docs/manifest.md §10): the entry of the build's scope is unpacked
into the workspace during the setup job, and a build that passed saves its paths after its last
job. Each step says what it did in one line of the job's output.

The engine (runner/execute.py) calls `restore` and `save` with a CacheSpec; where entries live
is the CacheStore's business: `ServerCaches` keeps them in the blob store and PostgreSQL
(marid/caches.py). The offline runner has none, so `marid run` ignores `cache:`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncpg

from marid import caches
from marid.blobs import BlobNotFound, BlobStore
from marid.config import CachesConfig
from marid.runner.drivers.base import Driver, DriverError, TooLarge

log = logging.getLogger(__name__)
Say = Callable[[str], Awaitable[None]]  # writes one of marid's lines to the job's output


@dataclass(frozen=True)
class Found:
    """A saved entry, fetched."""

    paths: list[str]
    size: int
    build_number: int | None  # the build that saved it; None once deleted


@dataclass(frozen=True)
class Saved:
    size: int
    evicted: list[str]  # keys of the entries evicted to make room


class CacheStore(Protocol):
    async def fetch(self, destination: Path) -> Found | None:
        """Write the saved tar to the local file `destination`; None when there is none."""

    async def save(self, archive: Path, paths: list[str]) -> Saved:
        """Keep the local tar `archive` of `paths` as the new entry."""


@dataclass(frozen=True)
class CacheSpec:
    key: str
    paths: list[str]  # relative to the workspace, normalised
    max_size: int  # bytes; a larger tar is not saved
    limit_setting: str  # the configuration key that sets max_size, for the message
    store: CacheStore


async def restore(cache: CacheSpec, driver: Driver, say: Say) -> None:
    """Unpack the scope's entry into the workspace, or say why not. Never fails the build: a
    cache is an optimisation, and the build must work without it."""
    name = f"cache {cache.key}"
    with tempfile.TemporaryDirectory(prefix="marid-cache-") as scratch:
        local = Path(scratch) / "cache.tar"
        try:
            found = await cache.store.fetch(local)
            if found is None:
                await say(f"{name}: nothing saved yet; starting without it")
                return
            await driver.extract(local)
        except DriverError as exc:
            await say(f"{name} not restored: {exc}")
            return
        except Exception as exc:  # the database's or the blob store's
            log.warning("cache %s not restored: %s", cache.key, exc)
            await say(f"{name} not restored: {_reason(exc)}")
            return
    by = f" (saved by build #{found.build_number})" if found.build_number is not None else ""
    await say(f"{name} restored: {_paths(len(found.paths))}, {size_text(found.size)}{by}")


async def save(cache: CacheSpec, driver: Driver, say: Say, status: str) -> None:
    """After the last job of a build that ended `status`: save its paths when it passed, or
    say why not. Never fails the build."""
    name = f"cache {cache.key}"
    if status != "passed":
        await say(f"{name} not saved: the build is {status}; only passed builds save a cache")
        return
    if cache.max_size <= 0:
        await say(f"{name} not saved: {cache.limit_setting} is 0 on this server")
        return
    with tempfile.TemporaryDirectory(prefix="marid-cache-") as scratch:
        local = Path(scratch) / "cache.tar"
        try:
            missing = await driver.archive(cache.paths, local, cache.max_size)
        except TooLarge:
            limit = size_text(cache.max_size)
            await say(f"{name} not saved: larger than {cache.limit_setting} ({limit})")
            return
        except DriverError as exc:
            await say(f"{name} not saved: {exc}")
            return
        kept = [path for path in cache.paths if path not in missing]
        if not kept:
            await say(f"{name} not saved: none of its paths exist ({', '.join(missing)})")
            return
        try:
            saved = await cache.store.save(local, kept)
        except Exception as exc:  # the database's or the blob store's
            log.warning("cache %s not saved: %s", cache.key, exc)
            await say(f"{name} not saved: {_reason(exc)}")
            return
    line = f"{name} saved: {_paths(len(kept))}, {size_text(saved.size)}"
    if missing:
        line += f" ({', '.join(missing)} did not exist)"
    if saved.evicted:
        line += f"; evicted the least recently used: {', '.join(saved.evicted)}"
    await say(line)


class ServerCaches:
    """The entries of one build's scope, kept in the blob store and the table `caches`."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        blobs: BlobStore,
        build_id: int | None,  # the saving build; None only in tests
        found: caches.BuildCache,
        max_total: int,
    ) -> None:
        self.pool = pool
        self.blobs = blobs
        self.build_id = build_id
        self.found = found
        self.scope = found.scope
        self.key = found.key
        self.max_total = max_total  # bytes kept per scope (caches.max_total)

    async def fetch(self, destination: Path) -> Found | None:
        async with self.pool.acquire() as conn:
            entry = await caches.use(conn, self.scope, self.key)
        if entry is None:
            return None
        try:
            await self.blobs.copy_to_file(entry.blob_key, destination)
        except BlobNotFound:  # replaced or deleted since the row was read
            return None
        return Found(entry.paths, entry.size, entry.build_number)

    async def save(self, archive: Path, paths: list[str]) -> Saved:
        """Write the blob, swap the row, then delete the blobs no row references: a failure
        in between deletes the new blob (or leaves it to the reaper, if the process dies)."""
        blob = await self.blobs.put_file(archive)
        stored = await caches.keep(
            self.pool, self.blobs, self.found, paths, blob, self.build_id, self.max_total
        )
        return Saved(blob.size, stored.evicted)


def server_cache(
    pool: asyncpg.Pool,
    blobs: BlobStore,
    config: CachesConfig,
    build_id: int,
    found: caches.BuildCache | None,
) -> CacheSpec | None:
    """The CacheSpec of a claimed build with a `cache:`; None without one."""
    if found is None:
        return None
    store = ServerCaches(pool, blobs, build_id, found, config.max_total)
    if config.max_size <= config.max_total:
        limit, setting = config.max_size, "caches.max_size"
    else:
        limit, setting = config.max_total, "caches.max_total"
    return CacheSpec(found.key, list(found.paths), limit, setting, store)


def size_text(size: int) -> str:
    """`size` bytes for people: `512 B`, `12.3 MiB`."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _paths(count: int) -> str:
    return f"{count} path" if count == 1 else f"{count} paths"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc) or type(exc).__name__
