"""Artifact retention against a real database and blob store (docs/manifest.md §6.7)."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg

from marid import curator
from marid.blobs import FsStore
from marid.users import User
from tests.conftest import MakeUser


async def make_build(
    pool: asyncpg.Pool, owner: User, number: int, sizes: list[int], store: FsStore,
    pinned: bool = False, status: str = "passed",
) -> list[str]:  # fmt: skip
    """A finished build with one collected artifact per size; returns their blob keys."""
    build_id = await pool.fetchval(
        """
        INSERT INTO builds (user_id, author_id, number, manifest, driver, status, pinned,
                            timeout_seconds, created_at)
        VALUES ($1, $1, $2, 'driver: {type: os}', 'os', $3, $4, 60,
                now() + $2::int * interval '1 s')
        RETURNING id
        """,
        owner.id,
        number,
        status,
        pinned,
    )
    stage = await pool.fetchval(
        "INSERT INTO build_stages (build_id, name, position) VALUES ($1, 's', 0) RETURNING id",
        build_id,
    )
    job = await pool.fetchval(
        "INSERT INTO build_jobs (build_id, stage_id, name, position, artifacts)"
        " VALUES ($1, $2, 'j', 0, $3) RETURNING id",
        build_id,
        stage,
        json.dumps([]),
    )
    keys = []
    for index, size in enumerate(sizes):
        blob = await store.put_bytes(b"x" * size)
        await pool.execute(
            """
            INSERT INTO build_artifacts (build_id, user_id, job_id, source, name, blob_key,
                                         size, md5, sha256)
            VALUES ($1, $2, $3, 'f', $4, $5, $6, $7, $8)
            """,
            build_id, owner.id, job, f"a{index}", blob.key, blob.size, blob.md5, blob.sha256,
        )  # fmt: skip
        keys.append(blob.key)
    return keys


async def test_oldest_unpinned_artifacts_go_first(
    pool: asyncpg.Pool, alice: User, make_user: MakeUser, tmp_path: Path
):
    store = FsStore(tmp_path / "blobs")
    oldest = await make_build(pool, alice, 1, [400], store)
    pinned = await make_build(pool, alice, 2, [5000], store, pinned=True)
    middle = await make_build(pool, alice, 3, [300, 300], store)
    running = await make_build(pool, alice, 4, [900], store, status="running")
    newest = await make_build(pool, alice, 5, [200], store)
    bob = await make_user("bob")
    bobs = await make_build(pool, bob, 1, [900], store)  # another owner's own budget

    assert await curator.run(pool, store, threshold=1000) == 1
    # Newest first: 200 + 300 + 300 = 800 kept; the 400 of build 1 would make 1200.
    for key in oldest:
        assert not await store.exists(key)
    for key in pinned + middle + running + newest + bobs:
        assert await store.exists(key)
    row = await pool.fetchrow(
        "SELECT deleted_at, size, md5, sha256, blob_key FROM build_artifacts WHERE size IS NULL"
    )
    assert row["deleted_at"] is not None
    assert (row["md5"], row["sha256"], row["blob_key"]) == (None, None, None)
    assert await curator.run(pool, store, threshold=1000) == 0  # nothing more to do
    await store.close()
