"""Build caches (docs/manifest.md §10, docs/api.md §26): the manifest's `cache:`, its snapshot
at submission, and the entries a passed build saves for the next build of its scope.

A scope is a namespace, or the owner for builds without one. Entries are tars in the blob
store; a row here is the only reference to its blob (docs/architecture.md §6.1).
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from marid.blobs import Blob, BlobStore
from marid.times import rfc3339
from marid.validation import Errors

if TYPE_CHECKING:
    from marid.lifecycle import Claim

FIELD = "cache"  # the field its validation errors are keyed by
DEFAULT_KEY = "default"
KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEY_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
MAX_PATHS = 32
MAX_PATH_LENGTH = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Cache:
    """The manifest's `cache:` (docs/manifest.md §10): workspace paths saved under `key`."""

    key: str
    paths: tuple[str, ...]  # relative to the workspace, normalised, none inside another


@dataclass(frozen=True)
class Scope:
    """Whose caches a build uses: a namespace's, or its owner's own (namespace_id None)."""

    user_id: int
    namespace_id: int | None

    @property
    def lock(self) -> str:
        """The advisory lock name that serialises saves in this scope."""
        if self.namespace_id is not None:
            return f"marid.caches:namespace:{self.namespace_id}"
        return f"marid.caches:user:{self.user_id}"


@dataclass(frozen=True)
class BuildCache:
    """A build's snapshot of its manifest's `cache:`, with its scope."""

    scope: Scope
    key: str
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Entry:
    id: int
    user_id: int
    namespace_id: int | None
    key: str
    paths: list[str]
    blob_key: str
    size: int
    created_at: datetime
    last_used_at: datetime
    build_owner: str | None  # username; None once the saving build is deleted
    build_number: int | None


@dataclass(frozen=True)
class Stored:
    """A save's outcome: the blobs no row references any more (delete them after commit), and
    the keys of the entries evicted to make room."""

    stale_blobs: list[str]
    evicted: list[str]


# -- The manifest's `cache:` ------------------------------------------------------------------


def parse(value: Any, workspace: str | None, errors: Errors) -> Cache | None:
    """`cache:` as the manifest gives it: a list of paths, or {key, paths}. Errors are added
    under `cache`; None when it is absent or invalid. `workspace` is the docker driver's (where
    absolute paths may point), None for the other drivers."""
    if value is None:
        return None
    paths: list[Any] | None
    if isinstance(value, list):
        key, paths = DEFAULT_KEY, value
    elif isinstance(value, dict):
        key, paths = _mapping(value, errors)
    else:
        errors.add(FIELD, "must be a list of paths, or a mapping with key and paths")
        return None
    if paths is None:
        return None
    found = _paths(paths, workspace, errors)
    if errors.has(FIELD):
        return None
    return Cache(key, tuple(found))


def check_sources(cache: Cache, directories: list[str], errors: Errors) -> None:
    """Refuse cache paths in or above a `sources` clone directory: the cache is restored before
    the clones run, and `git clone` refuses a directory that is not empty."""
    for index, path in enumerate(cache.paths):
        for number, directory in enumerate(directories):
            clone = posixpath.normpath("./" + directory)
            if path == clone or path.startswith(clone + "/") or clone.startswith(path + "/"):
                errors.add(
                    FIELD,
                    f"paths[{index}] {path} overlaps the clone directory of sources[{number}]",
                )


def _mapping(value: dict[Any, Any], errors: Errors) -> tuple[str, list[Any] | None]:
    for name in sorted(str(name) for name in value if name not in ("key", "paths")):
        errors.add(FIELD, f"unknown key {name}: a cache has key and paths")
    key = value.get("key")
    if key is None:
        key = DEFAULT_KEY
    elif not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        errors.add(FIELD, f"key must be {KEY_RULE}")
    paths = value.get("paths")
    if paths is None:
        errors.add(FIELD, "paths is required")
    elif not isinstance(paths, list):
        errors.add(FIELD, "paths must be a list of paths")
        paths = None
    return str(key), paths


def _paths(entries: list[Any], workspace: str | None, errors: Errors) -> list[str]:
    if not entries:
        errors.add(FIELD, "paths must name at least one path")
    if len(entries) > MAX_PATHS:
        errors.add(FIELD, f"paths must name at most {MAX_PATHS} paths")
    found: list[str] = []
    for index, entry in enumerate(entries):
        path = _path(entry, f"paths[{index}]", workspace, errors)
        if path is None:
            continue
        if path in found:
            errors.add(FIELD, f"paths[{index}] {path} is listed twice")
            continue
        for earlier in found:
            if path.startswith(earlier + "/") or earlier.startswith(path + "/"):
                errors.add(FIELD, f"paths[{index}] {path} overlaps {earlier}")
                break
        found.append(path)
    return found


def _path(entry: Any, label: str, workspace: str | None, errors: Errors) -> str | None:
    """`entry` relative to the workspace and normalised; None (an error added) if invalid."""
    if not isinstance(entry, str):
        errors.add(FIELD, f"{label} must be a string")
        return None
    text = entry.strip()
    problem = ""
    if not text:
        problem = "must not be empty"
    elif len(text) > MAX_PATH_LENGTH:
        problem = f"must be at most {MAX_PATH_LENGTH} characters"
    elif _CONTROL.search(text):
        problem = "must not contain control characters"
    elif ".." in text.split("/"):
        problem = "must not contain .."
    if problem:
        errors.add(FIELD, f"{label} {problem}")
        return None
    if text.startswith("/"):
        root = posixpath.normpath(workspace) if workspace else None
        if root is None or not (text + "/").startswith(root.rstrip("/") + "/"):
            where = f"the workspace {root}" if root else "the workspace (use a relative path)"
            errors.add(FIELD, f"{label} {text} is outside {where}")
            return None
        text = text[len(root) :]
    path = posixpath.normpath("./" + text.lstrip("/"))
    if path == ".":
        errors.add(FIELD, f"{label} {entry.strip()} is the whole workspace")
        return None
    return path


# -- Snapshots at submission and their use by runners ------------------------------------------


async def record(conn: asyncpg.Connection, builds: list[tuple[int, Scope, Cache]]) -> None:
    """Freeze each build's `cache:` and scope (build id, scope, cache). The caller owns the
    transaction (the submission's)."""
    if not builds:
        return
    await conn.execute(
        """
        INSERT INTO build_caches (build_id, user_id, namespace_id, key, paths)
        SELECT b.build_id, b.user_id, b.namespace_id, b.key,
               ARRAY(SELECT jsonb_array_elements_text(b.paths))
        FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::jsonb[])
             AS b(build_id, user_id, namespace_id, key, paths)
        """,
        [build_id for build_id, _, _ in builds],
        [scope.user_id for _, scope, _ in builds],
        [scope.namespace_id for _, scope, _ in builds],
        [cache.key for _, _, cache in builds],
        [_json_list(cache.paths) for _, _, cache in builds],
    )


def _json_list(items: tuple[str, ...]) -> str:
    return json.dumps(list(items))


async def of_build(conn: asyncpg.Connection, build_id: int) -> BuildCache | None:
    """The build's `cache:` as submitted; None without one (or once its namespace is gone)."""
    row = await conn.fetchrow(
        "SELECT user_id, namespace_id, key, paths FROM build_caches WHERE build_id = $1",
        build_id,
    )
    if row is None:
        return None
    return BuildCache(Scope(row["user_id"], row["namespace_id"]), row["key"], tuple(row["paths"]))


async def use(conn: asyncpg.Connection, scope: Scope, key: str) -> Entry | None:
    """The entry to restore, its last use set to now (the LRU order); None when there is none.
    One statement: the caller needs no transaction."""
    row = await conn.fetchrow(
        """
        WITH c AS (
            UPDATE caches SET last_used_at = now()
            WHERE (namespace_id = $1 OR ($1::bigint IS NULL AND namespace_id IS NULL
                                         AND user_id = $2))
              AND key = $3
            RETURNING *
        )
        SELECT c.id, c.user_id, c.namespace_id, c.key, c.paths, c.blob_key, c.size,
               c.created_at, c.last_used_at, u.username AS build_owner, b.number AS build_number
        FROM c LEFT JOIN builds b ON b.id = c.build_id LEFT JOIN users u ON u.id = b.user_id
        """,
        scope.namespace_id,
        scope.user_id,
        key,
    )
    return Entry(**row) if row else None


async def store(
    conn: asyncpg.Connection,
    scope: Scope,
    key: str,
    paths: list[str],
    blob: tuple[str, int],
    build_id: int | None,
    max_total: int,
) -> Stored:
    """Make the blob (key, size) the entry `key` of `scope`, replacing the one before, then
    evict the least recently used other entries while the scope holds more than `max_total`
    bytes. Saves of one scope are serialised by an advisory lock held until the caller's
    transaction ends (the last to commit wins); the caller deletes `stale_blobs` after it."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", scope.lock)
    old = await conn.fetchval(
        """
        DELETE FROM caches
        WHERE (namespace_id = $1 OR ($1::bigint IS NULL AND namespace_id IS NULL
                                     AND user_id = $2))
          AND key = $3
        RETURNING blob_key
        """,
        scope.namespace_id,
        scope.user_id,
        key,
    )
    await conn.execute(
        """
        INSERT INTO caches (user_id, namespace_id, key, paths, blob_key, size, build_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        """,
        scope.user_id,
        scope.namespace_id,
        key,
        paths,
        *blob,
        build_id,
    )
    evicted = await _evict(conn, scope, key, max_total)
    stale = ([old] if old is not None else []) + [blob_key for _, blob_key in evicted]
    return Stored(stale, [name for name, _ in evicted])


async def keep(
    pool: asyncpg.Pool,
    blobs: BlobStore,
    found: BuildCache,
    paths: list[str],
    blob: Blob,
    build_id: int | None,
    max_total: int,
    claim: Claim | None = None,
) -> Stored:
    """Make the stored `blob` the entry of the build's cache scope (`store`, in a transaction
    of its own, fenced by `claim` when given: a runner's save), then delete the blobs no row
    references any more. When that fails, `blob` is deleted before the error is raised (or
    left to the reaper, if the process dies)."""
    from marid import lifecycle  # here: lifecycle imports the manifest, which imports caches

    try:
        async with pool.acquire() as conn, conn.transaction():
            if claim is not None:
                await lifecycle.fence(conn, claim)
            stored = await store(
                conn, found.scope, found.key, paths, (blob.key, blob.size), build_id, max_total
            )
    except BaseException:
        with contextlib.suppress(Exception):
            await blobs.delete(blob.key)
        raise
    for key in stored.stale_blobs:
        with contextlib.suppress(Exception):  # else the API's reaper removes it later
            await blobs.delete(key)
    return stored


async def _evict(
    conn: asyncpg.Connection, scope: Scope, kept: str, max_total: int
) -> list[tuple[str, str]]:
    """Delete the least recently used entries but `kept` while the scope is over `max_total`;
    their (key, blob key)."""
    rows = await conn.fetch(
        """
        SELECT key, blob_key, size FROM caches
        WHERE namespace_id = $1 OR ($1::bigint IS NULL AND namespace_id IS NULL AND user_id = $2)
        ORDER BY key = $3, last_used_at, id
        """,
        scope.namespace_id,
        scope.user_id,
        kept,
    )
    total = sum(row["size"] for row in rows)
    evicted = []
    for row in rows:
        if total <= max_total or row["key"] == kept:
            break
        evicted.append((row["key"], row["blob_key"]))
        total -= row["size"]
    await delete(conn, scope, [name for name, _ in evicted])
    return evicted


# -- The API's listing and deletion ------------------------------------------------------------


async def count(conn: asyncpg.Connection, scope: Scope) -> int:
    return int(
        await conn.fetchval(
            """
            SELECT count(*) FROM caches
            WHERE namespace_id = $1
               OR ($1::bigint IS NULL AND namespace_id IS NULL AND user_id = $2)
            """,
            scope.namespace_id,
            scope.user_id,
        )
    )


async def page(
    conn: asyncpg.Connection, scope: Scope, offset: int, limit: int, key: str | None = None
) -> list[Entry]:
    """The scope's entries (only `key`, when given), most recently used first."""
    rows = await conn.fetch(
        """
        SELECT c.id, c.user_id, c.namespace_id, c.key, c.paths, c.blob_key, c.size,
               c.created_at, c.last_used_at, u.username AS build_owner, b.number AS build_number
        FROM caches c LEFT JOIN builds b ON b.id = c.build_id LEFT JOIN users u ON u.id = b.user_id
        WHERE (c.namespace_id = $1
               OR ($1::bigint IS NULL AND c.namespace_id IS NULL AND c.user_id = $2))
          AND ($5::text IS NULL OR c.key = $5)
        ORDER BY c.last_used_at DESC, c.id DESC OFFSET $3 LIMIT $4
        """,
        scope.namespace_id,
        scope.user_id,
        offset,
        limit,
        key,
    )
    return [Entry(**row) for row in rows]


async def get(conn: asyncpg.Connection, scope: Scope, key: str) -> Entry | None:
    found = await page(conn, scope, 0, 1, key)
    return found[0] if found else None


async def delete(conn: asyncpg.Connection, scope: Scope, keys: list[str] | None) -> list[str]:
    """Delete the entries `keys` of `scope` (None: every entry); the blob keys, to delete once
    the caller's transaction commits."""
    if keys == []:
        return []
    rows = await conn.fetch(
        """
        DELETE FROM caches
        WHERE (namespace_id = $1 OR ($1::bigint IS NULL AND namespace_id IS NULL
                                     AND user_id = $2))
          AND ($3::text[] IS NULL OR key = ANY($3::text[]))
        RETURNING blob_key
        """,
        scope.namespace_id,
        scope.user_id,
        keys,
    )
    return [row["blob_key"] for row in rows]


def to_json(entry: Entry, base_url: str, api_url: str) -> dict[str, Any]:
    """The cache entity (docs/api.md §26.1); `base_url` is the scope's caches URL."""
    build = None
    if entry.build_owner is not None:
        build = f"{api_url}/b/{entry.build_owner}/{entry.build_number}"
    return {
        "key": entry.key,
        "paths": entry.paths,
        "size": entry.size,
        "created_at": rfc3339(entry.created_at),
        "last_used_at": rfc3339(entry.last_used_at),
        "build_url": build,
        "url": f"{base_url}/{entry.key}",
    }
