"""The blob store, each case run against both backends: a directory and moto's S3 server."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from marid import blobs
from marid import config as config_module
from marid.blobs import Blob, BlobNotFound, BlobStore, BlobTooLarge

StoredBlobs = Callable[[], list[str]]
BINARY = bytes(range(256)) * 16 + b"\x00\r\n\xff"
BIG = random.Random(1).randbytes(9 * 1024**2 + 123)  # past boto3's 8 MiB multipart threshold
NEEDED = {
    "server": {"url": "https://ci.example.com"},
    "database": {"dsn": "postgresql://marid@127.0.0.1/marid"},
    "crypto": {"key": "k" * 32},
}


async def pieces(data: bytes, size: int = 100_003) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def failing(after: bytes) -> AsyncIterator[bytes]:
    yield after
    raise ConnectionResetError("client went away")


def expected(data: bytes) -> tuple[int, str, str]:
    return len(data), hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()


def facts(blob: Blob) -> tuple[int, str, str]:
    return blob.size, blob.md5, blob.sha256


async def test_binary_round_trip_is_byte_identical(blob_store: BlobStore) -> None:
    blob = await blob_store.put_bytes(BINARY)
    assert facts(blob) == expected(BINARY)
    assert await blob_store.read(blob.key) == BINARY
    assert await blob_store.size(blob.key) == len(BINARY)
    assert await blob_store.exists(blob.key)


async def test_multi_megabyte_stream_round_trips_in_chunks(blob_store: BlobStore) -> None:
    blob = await blob_store.put(pieces(BIG))
    assert facts(blob) == expected(BIG)
    chunks = [chunk async for chunk in await blob_store.open(blob.key)]
    assert len(chunks) > 1
    assert max(len(chunk) for chunk in chunks) <= blobs.CHUNK_SIZE
    assert b"".join(chunks) == BIG


async def test_copy_to_file_writes_the_content(blob_store: BlobStore, tmp_path: Path) -> None:
    blob = await blob_store.put(pieces(BIG))
    target = tmp_path / "copy.bin"
    await blob_store.copy_to_file(blob.key, target)
    assert target.read_bytes() == BIG


async def test_put_file_stores_the_file(blob_store: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "artifact.bin"
    source.write_bytes(BIG)
    blob = await blob_store.put_file(source, max_size=len(BIG))
    assert facts(blob) == expected(BIG)
    assert await blob_store.read(blob.key) == BIG


async def test_empty_content_is_a_blob(blob_store: BlobStore) -> None:
    blob = await blob_store.put_bytes(b"")
    assert facts(blob) == expected(b"")
    assert await blob_store.read(blob.key) == b""


async def test_every_put_gets_a_new_key(blob_store: BlobStore) -> None:
    first = await blob_store.put_bytes(b"same")
    second = await blob_store.put_bytes(b"same")
    assert first.key != second.key
    assert blobs.check_key(first.key) == first.key


async def test_content_of_exactly_max_size_is_accepted(blob_store: BlobStore) -> None:
    blob = await blob_store.put(pieces(BINARY, 1000), max_size=len(BINARY))
    assert blob.size == len(BINARY)


async def test_over_limit_raises_and_leaves_nothing(
    blob_store: BlobStore, stored_blobs: StoredBlobs
) -> None:
    with pytest.raises(BlobTooLarge):
        await blob_store.put(pieces(BIG), max_size=len(BIG) - 1)
    assert stored_blobs() == []


async def test_over_limit_file_raises_and_leaves_nothing(
    blob_store: BlobStore, stored_blobs: StoredBlobs, tmp_path: Path
) -> None:
    source = tmp_path / "artifact.bin"
    source.write_bytes(BINARY)
    with pytest.raises(BlobTooLarge):
        await blob_store.put_file(source, max_size=100)
    assert stored_blobs() == []


async def test_failing_stream_leaves_nothing(
    blob_store: BlobStore, stored_blobs: StoredBlobs
) -> None:
    with pytest.raises(ConnectionResetError):
        await blob_store.put(failing(BIG))
    assert stored_blobs() == []


async def test_missing_source_file_leaves_nothing(
    blob_store: BlobStore, stored_blobs: StoredBlobs, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError):
        await blob_store.put_file(tmp_path / "nowhere.bin")
    assert stored_blobs() == []


async def test_cancelled_while_streaming_leaves_nothing(
    blob_store: BlobStore, stored_blobs: StoredBlobs
) -> None:
    started = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield BINARY
        started.set()
        await asyncio.Event().wait()  # a client that stops sending
        yield BINARY

    upload = asyncio.ensure_future(blob_store.put(stalls()))
    await started.wait()
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert stored_blobs() == []


async def test_cancelled_after_the_last_chunk_leaves_nothing(
    blob_store: BlobStore, stored_blobs: StoredBlobs
) -> None:
    drained = asyncio.Event()

    async def then_signal() -> AsyncIterator[bytes]:
        async for chunk in pieces(BIG):
            yield chunk
        drained.set()  # the store is now finishing: fsync and rename, or the S3 upload

    upload = asyncio.ensure_future(blob_store.put(then_signal()))
    await drained.wait()
    assert upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    await blob_store.close()  # waits for an S3 upload that could not be interrupted
    assert stored_blobs() == []


async def test_delete_removes_the_blob_and_is_idempotent(
    blob_store: BlobStore, stored_blobs: StoredBlobs
) -> None:
    blob = await blob_store.put_bytes(BINARY)
    assert len(stored_blobs()) == 1
    await blob_store.delete(blob.key)
    assert not await blob_store.exists(blob.key)
    with pytest.raises(BlobNotFound):
        await blob_store.read(blob.key)
    await blob_store.delete(blob.key)
    assert stored_blobs() == []


async def test_missing_key_is_not_found(blob_store: BlobStore, tmp_path: Path) -> None:
    key = blobs.new_key()
    target = tmp_path / "copy.bin"
    with pytest.raises(BlobNotFound):
        await blob_store.read(key)
    with pytest.raises(BlobNotFound):
        await blob_store.open(key)
    with pytest.raises(BlobNotFound):
        await blob_store.size(key)
    with pytest.raises(BlobNotFound):
        await blob_store.copy_to_file(key, target)
    assert not target.exists()
    assert not await blob_store.exists(key)
    await blob_store.delete(key)


MALFORMED = [
    "../../etc/passwd",
    "../victim",
    "",
    "0" * 31,
    "0" * 33,
    "A" * 32,
    "0" * 31 + "/",
    "../" + "0" * 29,
    "0" * 30 + "/.",
]


@pytest.mark.parametrize("key", MALFORMED)
async def test_malformed_key_is_rejected_without_touching_anything(
    blob_store: BlobStore, stored_blobs: StoredBlobs, tmp_path: Path, key: str
) -> None:
    kept = await blob_store.put_bytes(b"kept")
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    target = tmp_path / "copy.bin"
    before = stored_blobs()
    for call in (
        blob_store.read(key),
        blob_store.open(key),
        blob_store.size(key),
        blob_store.exists(key),
        blob_store.delete(key),
        blob_store.copy_to_file(key, target),
    ):
        with pytest.raises(ValueError, match="not a blob key"):
            await call
    with pytest.raises(ValueError, match="not a blob key"):
        await blob_store.delete(str(victim))  # an absolute path would replace the root
    assert stored_blobs() == before
    assert victim.read_bytes() == b"victim"
    assert not target.exists()
    assert await blob_store.read(kept.key) == b"kept"


async def test_open_store_builds_the_configured_backend(
    storage_settings: dict[str, Any],
) -> None:
    config = config_module.from_dict({**NEEDED, "storage": storage_settings})
    store = blobs.open_store(config.storage)
    try:
        kind = {"fs": blobs.FsStore, "s3": blobs.S3Store}[storage_settings["backend"]]
        assert isinstance(store, kind)
        blob = await store.put_bytes(BINARY)
        assert await store.read(blob.key) == BINARY
        await store.delete(blob.key)
    finally:
        await store.close()


def test_storage_defaults_to_a_local_directory() -> None:
    storage = config_module.from_dict(NEEDED).storage
    assert storage == config_module.StorageConfig(
        backend="fs",
        path=".marid/blobs",
        s3=config_module.S3Config(
            bucket="",
            prefix="",
            endpoint_url=None,
            region="us-east-1",
            access_key_id=None,
            secret_access_key=None,
        ),
    )


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ({"backend": "s3"}, "storage.s3.bucket: required when storage.backend is s3"),
        ({"backend": "gcs"}, "storage.backend: must be one of fs, s3, not 'gcs'"),
        ({"path": ""}, "storage.path: required when storage.backend is fs"),
        ({"s3": {"bucket_name": "b"}}, "storage.s3.bucket_name: unknown key"),
        ({"s3": {"endpoint_url": "minio:9000"}}, "storage.s3.endpoint_url: must be an absolute"),
        ({"s3": {"access_key_id": "AKIA"}}, "storage.s3.access_key_id and storage.s3.secret"),
    ],
)
def test_bad_storage_config_is_an_error_naming_the_key(
    storage: dict[str, Any], message: str
) -> None:
    with pytest.raises(config_module.ConfigError) as caught:
        config_module.from_dict({**NEEDED, "storage": storage})
    assert str(caught.value).startswith("config: " + message)


def test_s3_config_is_read() -> None:
    s3 = {"bucket": "b", "prefix": "ci/", "endpoint_url": "http://127.0.0.1:9000/"}
    storage = config_module.from_dict({**NEEDED, "storage": {"backend": "s3", "s3": s3}}).storage
    assert storage.backend == "s3"
    assert (storage.s3.bucket, storage.s3.prefix) == ("b", "ci/")
    assert storage.s3.endpoint_url == "http://127.0.0.1:9000"


async def test_stored_files_are_readable_by_the_service_user_alone(tmp_path: Path) -> None:
    """Issue 11 row 18: blobs hold other users' uploads; with a umask of 022 they were 0644."""
    store = blobs.FsStore(tmp_path / "blobs")
    blob = await store.put(pieces(b"secret upload"))
    path = tmp_path / "blobs" / blob.key[:2] / blob.key
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
