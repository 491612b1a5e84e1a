"""The API's reaper (marid/reaper.py, docs/configuration.md §1.3 `reaper`): spool files,
unfinished uploads and orphan blobs go once older than the grace period; what is young, held
by a live process or referenced by a row stays. Real files, real PostgreSQL, fs and S3."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from marid import images, objects, reaper
from marid.blobs import S3_SPOOL, BlobStore, FsStore, S3Store, hold, s3_client
from marid.config import Config, S3Config
from marid.uploads import SPOOL, spool
from marid.users import User
from tests.fixtures.s3 import s3_settings

GRACE = 3600.0
OLD = timedelta(seconds=GRACE + 60)  # a little more than the grace period


def touch(path: Path, age: timedelta, now: datetime | None = None) -> Path:
    """A file at `path` last written `age` before `now` (default: the real time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"left behind")
    when = ((now or datetime.now(UTC)) - age).timestamp()
    os.utime(path, (when, when))
    return path


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tmp"
    directory.mkdir()
    return directory


@pytest.fixture
def make_reaper(
    pool: asyncpg.Pool, blob_store: BlobStore, spool_dir: Path
) -> Callable[[], reaper.Reaper]:
    return lambda: reaper.Reaper(pool, blob_store, GRACE, temp_dir=spool_dir)


async def test_spool_files_older_than_the_grace_period_go_younger_and_held_ones_stay(
    pool: asyncpg.Pool, tmp_path: Path, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    store = FsStore(tmp_path / "blobs")
    old = touch(spool_dir / f"{SPOOL[0]}dead{SPOOL[1]}", OLD)
    young = touch(spool_dir / f"{SPOOL[0]}young{SPOOL[1]}", timedelta(minutes=5))
    other = touch(spool_dir / "someone-else.part", OLD)  # not marid's
    # An upload still being received by this (live) process, last written long ago.
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    held = await spool(chunks(b"still uploading"), max_size=0)
    assert held.path is not None and held.path.parent == spool_dir
    when = (datetime.now(UTC) - OLD).timestamp()
    os.utime(held.path, (when, when))

    reaped = await reaper.Reaper(pool, store, GRACE, temp_dir=spool_dir).tick(datetime.now(UTC))

    assert reaped.files == 1
    assert names(spool_dir) == sorted([young.name, other.name, held.path.name])
    assert not old.exists()
    held.discard()  # the request ends: its file goes, and nothing is left held
    assert names(spool_dir) == sorted([young.name, other.name])


async def test_spool_file_of_a_finished_request_is_released(
    pool: asyncpg.Pool, tmp_path: Path, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """A spool file's lock lives exactly as long as the request's use of it: a file left by a
    request that ended without removing it (e.g. its unlink failed) is no longer held."""
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    content = await spool(chunks(b"abc"), max_size=0)
    assert content.path is not None
    kept = spool_dir / f"{SPOOL[0]}copy{SPOOL[1]}"
    os.link(content.path, kept)  # the same file under a second name, outliving discard()
    content.discard()
    when = (datetime.now(UTC) - OLD).timestamp()
    os.utime(kept, (when, when))
    store = FsStore(tmp_path / "blobs")
    reaped = await reaper.Reaper(pool, store, GRACE, temp_dir=spool_dir).tick(datetime.now(UTC))
    assert (reaped.files, names(spool_dir)) == (1, [])


async def test_fs_part_files_older_than_the_grace_period_go(pool: asyncpg.Pool, tmp_path: Path):
    root = tmp_path / "blobs"
    store = FsStore(root)
    kept = await store.put_bytes(b"complete")
    dead = touch(root / "ab" / f".{'ab' + '0' * 30}.part", OLD)
    young = touch(root / "cd" / f".{'cd' + '1' * 30}.part", timedelta(minutes=1))
    writing = touch(root / "ef" / f".{'ef' + '2' * 30}.part", OLD)
    with writing.open("rb") as held:
        hold(held.fileno())  # as FsStore.put holds the file it writes
        reaped = await reaper.Reaper(pool, store, GRACE, temp_dir=tmp_path).tick(datetime.now(UTC))
    assert reaped.partial == 1
    assert not dead.exists() and young.exists() and writing.exists()
    assert await store.read(kept.key) == b"complete"


@pytest.fixture
async def s3_store(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> AsyncIterator[S3Store]:
    settings = S3Config(**s3_settings(s3_endpoint, s3_bucket))
    store = S3Store(s3_client(settings), s3_bucket, settings.prefix, tmp_path / "spool")
    yield store
    await store.close()


async def test_s3_spool_files_and_abandoned_multipart_uploads_go(
    pool: asyncpg.Pool, s3_store: S3Store, tmp_path: Path
):
    client, bucket, prefix = s3_store.client, s3_store.bucket, s3_store.prefix
    upload = client.create_multipart_upload(Bucket=bucket, Key=prefix + "0" * 32)["UploadId"]
    foreign = client.create_multipart_upload(Bucket=bucket, Key=prefix + "x.bin")["UploadId"]

    def pending() -> dict[str, datetime]:
        listed = client.list_multipart_uploads(Bucket=bucket)["Uploads"]
        return {u["UploadId"]: u["Initiated"] for u in listed}

    # The clock runs from when S3 says the upload started (moto reports a fixed date).
    now = pending()[upload] + OLD
    spool_files = tmp_path / "spool"
    dead = touch(spool_files / f"{S3_SPOOL[0]}dead{S3_SPOOL[1]}", OLD, now)
    young = touch(spool_files / f"{S3_SPOOL[0]}young{S3_SPOOL[1]}", timedelta(minutes=5), now)
    sweeper = reaper.Reaper(pool, s3_store, GRACE, temp_dir=tmp_path)

    # Older than the grace period, but a multipart upload may still be running for a day.
    reaped = await sweeper.tick(now)
    assert (reaped.partial, names(spool_files)) == (1, [young.name])
    assert not dead.exists()
    assert sorted(pending()) == sorted([upload, foreign])

    reaped = await sweeper.tick(now + timedelta(days=1))
    assert reaped.partial == 2  # the young spool file has aged too
    assert list(pending()) == [foreign]  # not one of marid's keys


async def test_an_orphan_blob_goes_at_the_second_sweep_and_referenced_ones_stay(
    pool: asyncpg.Pool,
    blob_store: BlobStore,
    alice: User,
    make_reaper: Callable[[], reaper.Reaper],
    stored_blobs: Callable[[], list[str]],
):
    orphan = await blob_store.put_bytes(b"its row never committed")
    object_blob = await blob_store.put_bytes(b"an object")
    image_blob = await blob_store.put_bytes(b"QFI\xfb an image")
    artifact_blob = await blob_store.put_bytes(b"an artifact")
    async with pool.acquire() as conn:
        await objects.create(conn, alice, None, "data.csv", "text/plain", object_blob)
        await images.create(conn, alice, None, "qemu", "disk", image_blob)
        await add_artifact(conn, alice, artifact_blob.key)
    sweeper = make_reaper()
    later = datetime.now(UTC) + OLD

    assert (await sweeper.tick(later)).blobs == 0  # first sighting: only suspected
    assert await blob_store.exists(orphan.key)
    assert (await sweeper.tick(later + timedelta(minutes=10))).blobs == 1
    assert not await blob_store.exists(orphan.key)
    for kept in (object_blob, image_blob, artifact_blob):
        assert await blob_store.exists(kept.key)
    assert len(stored_blobs()) == 3  # nothing else is left: no .part file, no spool file


async def test_a_young_blob_stays_and_a_suspect_that_gains_a_row_stays(
    pool: asyncpg.Pool,
    blob_store: BlobStore,
    alice: User,
    make_reaper: Callable[[], reaper.Reaper],
):
    young = await blob_store.put_bytes(b"written just now, row about to commit")
    late = await blob_store.put_bytes(b"its row committed between two sweeps")
    sweeper = make_reaper()
    now = datetime.now(UTC)
    # At `now`, `young` is within the grace period: it is not even a suspect.
    assert (await sweeper.tick(now)).blobs == 0
    assert (await sweeper.tick(now + timedelta(minutes=10))).blobs == 0
    assert await blob_store.exists(young.key)
    # Seen unreferenced once (as if its writer were very slow), then the row commits.
    later = now + OLD
    await sweeper.tick(later)
    async with pool.acquire() as conn:
        await objects.create(conn, alice, None, "late.txt", "text/plain", late)
    assert (await sweeper.tick(later + timedelta(minutes=10))).blobs == 1  # `young` only
    assert await blob_store.exists(late.key)
    assert not await blob_store.exists(young.key)


async def test_without_blob_columns_nothing_is_deleted(
    pool: asyncpg.Pool, config: Config, blob_store: BlobStore, tmp_path: Path
):
    """A database whose schema shows no blob key column (wrong database, wrong search_path)
    must not make every blob an orphan."""
    blob = await blob_store.put_bytes(b"precious")
    async with pool.acquire() as conn:
        await conn.execute("CREATE SCHEMA empty")
    empty = await asyncpg.create_pool(
        config.database.dsn, min_size=1, max_size=1, server_settings={"search_path": "empty"}
    )
    try:
        sweeper = reaper.Reaper(empty, blob_store, GRACE, temp_dir=tmp_path)
        later = datetime.now(UTC) + OLD
        for minutes in (0, 10):
            with pytest.raises(RuntimeError, match="no column holds blob keys"):
                await sweeper.tick(later + timedelta(minutes=minutes))
    finally:
        await empty.close()
    assert await blob_store.exists(blob.key)


# Columns whose name says "key" or "blob" that hold something other than blob keys. A new
# column holding blob keys must be named blob_key or *_blob_key, or the reaper deletes what
# it references: this test makes whoever adds such a column decide which it is.
NOT_BLOB_KEYS = {
    ("idempotency_keys", "key"),
    ("ssh_keys", "key_sealed"),
    ("build_keys", "key_id"),
    ("build_keys", "key_sealed"),
    ("variables", "key"),
    ("build_variables", "key"),
    ("caches", "key"),  # the manifest's cache key (docs/manifest.md §10); its tar: blob_key
    ("build_caches", "key"),
}


async def test_every_column_that_may_hold_blob_keys_is_known(pool: asyncpg.Pool):
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """
            SELECT c.table_name, c.column_name FROM information_schema.columns c
            JOIN information_schema.tables t USING (table_schema, table_name)
            WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'
              AND (c.column_name LIKE '%key%' OR c.column_name LIKE '%blob%')
            """
        )
        found = await reaper.blob_columns(conn)
    blob_columns = {(table, column) for _, table, column in found}
    assert {("objects", "blob_key"), ("images", "blob_key")} <= blob_columns
    assert ("build_artifacts", "blob_key") in blob_columns
    unknown = {(r[0], r[1]) for r in rows} - blob_columns - NOT_BLOB_KEYS
    assert unknown == set(), "name blob key columns *blob_key, or add them to NOT_BLOB_KEYS"


async def test_a_failing_sweep_is_retried_and_logged_once_per_outage(
    caplog: pytest.LogCaptureFixture,
):
    stop = asyncio.Event()
    outcomes = [OSError("blob store away"), OSError("still away"), None, OSError("again"), None]
    seen: list[datetime] = []

    async def tick(now: datetime) -> None:
        seen.append(now)
        outcome = outcomes.pop(0)
        if not outcomes:
            stop.set()
        if outcome is not None:
            raise outcome

    clock = iter(datetime(2024, 3, 1, tzinfo=UTC) + timedelta(minutes=n) for n in range(10))
    with caplog.at_level(logging.INFO, logger="marid.reaper"):
        await reaper.repeat(tick, 0.001, stop, "test reaper", clock=lambda: next(clock))
    assert len(seen) == 5 and seen == sorted(seen)
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "marid.reaper"]
    assert messages == [
        ("WARNING", "test reaper failed, retrying until it works: OSError: blob store away"),
        ("INFO", "test reaper works again (failed 2 times)"),
        ("WARNING", "test reaper failed, retrying until it works: OSError: again"),
        ("INFO", "test reaper works again (failed 1 times)"),
    ]


async def add_artifact(conn: asyncpg.Connection, owner: User, blob_key: str) -> None:
    """A finished build with one job and one artifact stored under `blob_key`."""
    build_id = await conn.fetchval(
        """
        INSERT INTO builds (user_id, author_id, number, manifest, driver, status, timeout_seconds)
        VALUES ($1, $1, 1, 'image: x', 'docker', 'passed', 60) RETURNING id
        """,
        owner.id,
    )
    stage = await conn.fetchval(
        "INSERT INTO build_stages (build_id, name, position) VALUES ($1, 's', 0) RETURNING id",
        build_id,
    )
    job = await conn.fetchval(
        "INSERT INTO build_jobs (build_id, stage_id, name, position)"
        " VALUES ($1, $2, 'j', 0) RETURNING id",
        build_id,
        stage,
    )
    await conn.execute(
        "INSERT INTO build_artifacts (build_id, user_id, job_id, source, name, blob_key)"
        " VALUES ($1, $2, $3, 'out.txt', 'out.txt', $4)",
        build_id,
        owner.id,
        job,
        blob_key,
    )


def test_config_defaults(config: Config):
    assert (config.reaper.interval, config.reaper.grace) == (600.0, 3600.0)
