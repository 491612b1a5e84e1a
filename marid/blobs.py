"""Blob storage for objects, artifacts and image tarballs: a local directory or an S3 bucket.

The store names every blob itself (`uuid4().hex`); callers keep that key in the database and
never derive one from a user-supplied name, so no path or object name is attacker-chosen.
A blob becomes visible under its key only once it is complete: a failed, oversized or
cancelled upload leaves nothing behind. The SDKs block, so their calls run in threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import boto3
import botocore.config
import botocore.exceptions

from marid.config import S3Config, StorageConfig

log = logging.getLogger(__name__)

CHUNK_SIZE = 256 * 1024
_KEY = re.compile(r"[0-9a-f]{32}")
_MISSING = ("404", "NoSuchKey", "NotFound")


class BlobNotFound(Exception):
    """No blob is stored under this key."""


class BlobTooLarge(Exception):
    """The content exceeds the `max_size` given to `put`."""

    def __init__(self, max_size: int) -> None:
        super().__init__(f"larger than {max_size} bytes")
        self.max_size = max_size


@dataclass(frozen=True)
class Blob:
    key: str
    size: int
    md5: str  # lowercase hex
    sha256: str  # lowercase hex


class BlobStore(ABC):
    """Where blobs live; every method taking a key raises ValueError for a malformed one."""

    @abstractmethod
    async def put(self, chunks: AsyncIterable[bytes], max_size: int = 0) -> Blob:
        """Store the streamed content under a new key; raises BlobTooLarge past `max_size` > 0."""

    @abstractmethod
    async def open(self, key: str) -> AsyncIterator[bytes]:
        """The content in chunks; raises BlobNotFound now if it is missing."""

    @abstractmethod
    async def size(self, key: str) -> int:
        """The content's length in bytes; raises BlobNotFound."""

    @abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether a blob is stored under `key`."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the blob; a missing key is not an error."""

    @abstractmethod
    async def copy_to_file(self, key: str, path: Path) -> None:
        """Write the content to `path`, replacing it; raises BlobNotFound."""

    @abstractmethod
    async def close(self) -> None:
        """Finish background clean-ups and release connections; the store is unusable after."""

    async def put_file(self, path: Path, max_size: int = 0) -> Blob:
        """Store the file at `path` under a new key; raises BlobTooLarge past `max_size` > 0."""
        return await self.put(_file_chunks(path), max_size)

    async def put_bytes(self, data: bytes) -> Blob:
        """Store `data` under a new key."""
        return await self.put(_single(data))

    async def read(self, key: str) -> bytes:
        """The whole content in memory (small blobs only); raises BlobNotFound."""
        return b"".join([chunk async for chunk in await self.open(key)])


def open_store(config: StorageConfig) -> BlobStore:
    """The store `config` describes (already checked by marid.config)."""
    if config.backend == "s3":
        return S3Store(s3_client(config.s3), config.s3.bucket, config.s3.prefix)
    return FsStore(Path(config.path))


def new_key() -> str:
    """A fresh blob key: 32 lowercase hex digits."""
    return uuid.uuid4().hex


def check_key(key: str) -> str:
    """`key` itself if the store could have made it; raises ValueError otherwise."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"not a blob key: {key!r}")
    return key


class FsStore(BlobStore):
    """Blobs as files under `root`, sharded by the first two hex digits of the key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        key = check_key(key)  # before any use: no other string may become a path
        return self.root / key[:2] / key

    async def put(self, chunks: AsyncIterable[bytes], max_size: int = 0) -> Blob:
        key = new_key()
        path = self._path(key)
        temp = path.with_name(f".{key}.part")  # same directory: os.replace stays atomic
        try:
            blob = await _spool(chunks, temp, _Digest(key, max_size), durable=True)
            os.replace(temp, path)  # not in a thread: a cancelled thread could still rename
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return blob

    async def open(self, key: str) -> AsyncIterator[bytes]:
        path = self._path(key)
        if not await asyncio.to_thread(path.is_file):
            raise BlobNotFound(key)
        return _blob_chunks(path, key)

    async def size(self, key: str) -> int:
        path = self._path(key)
        try:
            stat = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        return stat.st_size

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    async def close(self) -> None:
        pass  # nothing held open between calls

    async def copy_to_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        try:
            await asyncio.to_thread(shutil.copyfile, source, path)
        except FileNotFoundError as exc:
            if exc.filename == str(source):
                raise BlobNotFound(key) from None
            raise


class S3Store(BlobStore):
    """Blobs as objects `<prefix><key>` in one bucket; uploads are spooled to a local file."""

    def __init__(
        self, client: Any, bucket: str, prefix: str = "", spool_dir: Path | None = None
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.spool_dir = spool_dir  # None: the system's temporary directory
        self._cleanups: set[asyncio.Task[None]] = set()

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    async def put(self, chunks: AsyncIterable[bytes], max_size: int = 0) -> Blob:
        key = new_key()
        name = self._name(key)
        fd, spool_name = tempfile.mkstemp(".part", "marid-blob-", self.spool_dir)
        os.close(fd)
        spool = Path(spool_name)
        try:
            blob = await _spool(chunks, spool, _Digest(key, max_size), durable=False)
            await self._upload(spool, name)
        finally:
            # Not in a thread, so a second cancellation cannot skip it; boto3 may still hold
            # the file open if its upload was cancelled, which POSIX allows.
            spool.unlink(missing_ok=True)  # noqa: ASYNC240
        return blob

    async def _upload(self, spool: Path, name: str) -> None:
        upload = asyncio.ensure_future(
            asyncio.to_thread(self.client.upload_file, str(spool), self.bucket, name)
        )
        try:
            await asyncio.shield(upload)
        except asyncio.CancelledError:
            # A boto3 call cannot be interrupted: once it ends, delete whatever it stored.
            cleanup = asyncio.ensure_future(self._delete_after(upload, name))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            raise

    async def _delete_after(self, upload: asyncio.Future[None], name: str) -> None:
        with suppress(Exception):
            await upload
        try:
            await asyncio.to_thread(self.client.delete_object, Bucket=self.bucket, Key=name)
        except Exception:
            log.exception("could not delete %s left by a cancelled upload", name)

    async def open(self, key: str) -> AsyncIterator[bytes]:
        await self.size(key)  # BlobNotFound now, before the caller starts a response
        return self._read_object(key)

    async def _read_object(self, key: str) -> AsyncIterator[bytes]:
        try:
            response = await asyncio.to_thread(
                self.client.get_object, Bucket=self.bucket, Key=self._name(key)
            )
        except botocore.exceptions.ClientError as exc:
            raise _not_found(exc, key) from None
        body = response["Body"]
        try:
            while chunk := await asyncio.to_thread(body.read, CHUNK_SIZE):
                yield chunk
        finally:
            body.close()

    async def size(self, key: str) -> int:
        try:
            head = await asyncio.to_thread(
                self.client.head_object, Bucket=self.bucket, Key=self._name(key)
            )
        except botocore.exceptions.ClientError as exc:
            raise _not_found(exc, key) from None
        return int(head["ContentLength"])

    async def exists(self, key: str) -> bool:
        try:
            await self.size(key)
        except BlobNotFound:
            return False
        return True

    async def delete(self, key: str) -> None:
        name = self._name(key)
        await asyncio.to_thread(self.client.delete_object, Bucket=self.bucket, Key=name)

    async def copy_to_file(self, key: str, path: Path) -> None:
        name = self._name(key)
        try:
            await asyncio.to_thread(self.client.download_file, self.bucket, name, str(path))
        except botocore.exceptions.ClientError as exc:
            raise _not_found(exc, key) from None

    async def close(self) -> None:
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        await asyncio.to_thread(self.client.close)


def s3_client(config: S3Config) -> Any:
    """A boto3 S3 client for `config`; keys left unset use boto3's default chain."""
    session = boto3.session.Session(
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        region_name=config.region,
    )
    # S3-compatible services (MinIO, moto, Ceph) rarely resolve <bucket>.<host> names.
    style = "path" if config.endpoint_url else "auto"
    settings = botocore.config.Config(s3={"addressing_style": style})
    return session.client("s3", endpoint_url=config.endpoint_url, config=settings)


def _not_found(exc: botocore.exceptions.ClientError, key: str) -> Exception:
    """BlobNotFound for a missing-object error, else `exc` itself."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return BlobNotFound(key) if code in _MISSING else exc


@dataclass
class _Digest:
    """Size and hashes of content seen so far, refusing to grow past `max_size` (> 0)."""

    key: str
    max_size: int
    size: int = 0
    md5: Any = field(default_factory=lambda: hashlib.md5(usedforsecurity=False))
    sha256: Any = field(default_factory=hashlib.sha256)

    def add(self, chunk: bytes) -> None:
        if self.max_size and self.size + len(chunk) > self.max_size:
            raise BlobTooLarge(self.max_size)
        self.size += len(chunk)
        self.md5.update(chunk)
        self.sha256.update(chunk)

    def blob(self) -> Blob:
        return Blob(self.key, self.size, self.md5.hexdigest(), self.sha256.hexdigest())


async def _spool(chunks: AsyncIterable[bytes], path: Path, digest: _Digest, durable: bool) -> Blob:
    """Write `chunks` to a new file at `path`; the caller removes it on failure."""
    # Created here rather than in a thread, so a cancelled caller never races its creation.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        async for chunk in chunks:
            await asyncio.to_thread(_write, out, digest, chunk)
        if durable:
            await asyncio.to_thread(_flush, out)
    return digest.blob()


def _write(out: BinaryIO, digest: _Digest, chunk: bytes) -> None:
    digest.add(chunk)  # raises BlobTooLarge before anything past the limit is written
    out.write(chunk)


def _flush(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    source = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(source.read, CHUNK_SIZE):
            yield chunk
    finally:
        source.close()


async def _blob_chunks(path: Path, key: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in _file_chunks(path):
            yield chunk
    except FileNotFoundError:  # deleted since `open` checked: only opening can raise this
        raise BlobNotFound(key) from None


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data
