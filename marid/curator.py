"""Artifact retention (docs/manifest.md §6.7): per owner, the artifacts of unpinned, finished
builds are kept newest first up to `artifacts.cleanup_threshold` bytes; older ones are
deleted. Pinned builds' artifacts are neither deleted nor counted. Runs in the scheduler."""

from __future__ import annotations

import logging

import asyncpg

from marid.blobs import BlobStore

log = logging.getLogger(__name__)


async def expire(conn: asyncpg.Connection, threshold: int) -> list[str]:
    """Mark the artifacts past each owner's threshold deleted; returns their blob keys, to
    remove once the caller's transaction has committed."""
    rows = await conn.fetch(
        """
        WITH ranked AS (
            SELECT a.id, a.blob_key,
                   sum(a.size) OVER (PARTITION BY a.user_id
                                     ORDER BY b.created_at DESC, b.id DESC, a.id DESC) AS kept
            FROM build_artifacts a JOIN builds b ON b.id = a.build_id
            WHERE a.blob_key IS NOT NULL AND a.deleted_at IS NULL AND NOT b.pinned
              AND b.status NOT IN ('queued', 'running')
        )
        UPDATE build_artifacts a
        SET deleted_at = now(), blob_key = NULL, size = NULL, md5 = NULL, sha256 = NULL
        FROM ranked r
        WHERE a.id = r.id AND r.kept > $1
        RETURNING r.blob_key
        """,
        threshold,
    )
    return [row["blob_key"] for row in rows]


async def run(pool: asyncpg.Pool, blobs: BlobStore, threshold: int) -> int:
    """One clean-up pass; returns how many artifacts were deleted."""
    async with pool.acquire() as conn, conn.transaction():
        keys = await expire(conn, threshold)
    for key in keys:
        await blobs.delete(key)
    if keys:
        log.info("deleted %d artifacts past the retention threshold", len(keys))
    return len(keys)
