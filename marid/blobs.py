"""Blob storage for objects, artifacts and image tarballs: a local directory or an S3 bucket.

The store names every blob itself (`uuid4().hex`); callers keep that key in the database and
never derive one from a user-supplied name, so no path or object name is attacker-chosen.
A blob becomes visible under its key only once it is complete: a failed, oversized or
cancelled upload leaves nothing behind. The SDKs block, so their calls run in threads.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
# The local file an S3 upload is spooled to (S3Store.put), in the spool or temporary directory.
S3_SPOOL = ("marid-blob-", ".part")
# An S3 multipart upload cannot be told from one still running, so only those this old are
# aborted: no upload of marid's lasts a day (S3Store.remove_partial).
MULTIPART_MAX_AGE = timedelta(days=1)


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


@dataclass(frozen=True)
class Stored:
    """A complete blob as a listing sees it: its key and when its content was written (UTC;
    for S3, the object's LastModified)."""

    key: str
    modified: datetime


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

    @abstractmethod
    def listing(self) -> AsyncIterator[list[Stored]]:
        """Every complete blob, in batches; for the reaper (marid/reaper.py)."""

    @abstractmethod
    async def remove_partial(self, before: datetime) -> int:
        """Remove uploads that never completed and were last written before `before`, unless
        a live process still writes them; returns how many were removed."""

    async def download_url(self, key: str, expires: float) -> str | None:
        """A URL that downloads the content without credentials for `expires` seconds (a
        presigned S3 URL), or None when the store has none to give; raises BlobNotFound."""
        await self.size(key)
        return None

    async def put_file(self, path: Path, max_size: int = 0) -> Blob:
        """Store the file at `path` under a new key; raises BlobTooLarge past `max_size` > 0."""
        return await self.put(_file_chunks(path), max_size)

    async def put_bytes(self, data: bytes) -> Blob:
        """Store `data` under a new key."""
        return await self.put(_single(data))

    async def read(self, key: str) -> bytes:
        """The whole content in memory (small blobs only); raises BlobNotFound."""
        return b"".join([chunk async for chunk in await self.open(key)])

    async def open_at(self, key: str, offset: int) -> AsyncIterator[bytes]:
        """The content from byte `offset` on, in chunks; raises BlobNotFound now if it is
        missing. The backends seek; this fallback reads and discards what comes before."""
        return _skip(await self.open(key), offset)

    async def read_range(self, key: str, offset: int, length: int) -> bytes:
        """At most `length` bytes from byte `offset`; raises BlobNotFound."""
        out = bytearray()
        chunks = await self.open_at(key, offset)
        try:
            async for chunk in chunks:
                out += chunk[: length - len(out)]
                if len(out) >= length:
                    break
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        return bytes(out)


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

    async def open_at(self, key: str, offset: int) -> AsyncIterator[bytes]:
        path = self._path(key)
        if not await asyncio.to_thread(path.is_file):
            raise BlobNotFound(key)
        return _blob_chunks(path, key, offset)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    async def close(self) -> None:
        pass  # nothing held open between calls

    async def listing(self) -> AsyncIterator[list[Stored]]:
        for shard in await asyncio.to_thread(_shards, self.root):
            batch = await asyncio.to_thread(_complete, shard)
            if batch:
                yield batch

    async def remove_partial(self, before: datetime) -> int:
        removed = 0
        for shard in await asyncio.to_thread(_shards, self.root):
            for path in await asyncio.to_thread(_partial, shard):
                removed += await asyncio.to_thread(remove_if_unused, path, before)
        return removed

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
        prefix, suffix = S3_SPOOL
        fd, spool_name = tempfile.mkstemp(suffix, prefix, self.spool_dir)
        hold(fd)  # until closed below: the reaper leaves a spool file alone while it is held
        spool = Path(spool_name)
        try:
            blob = await _spool(chunks, spool, _Digest(key, max_size), durable=False)
            await self._upload(spool, name)
        finally:
            # Not in a thread, so a second cancellation cannot skip it; boto3 may still hold
            # the file open if its upload was cancelled, which POSIX allows.
            spool.unlink(missing_ok=True)  # noqa: ASYNC240
            os.close(fd)
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

    async def download_url(self, key: str, expires: float) -> str | None:
        await self.size(key)
        url: str = self.client.generate_presigned_url(  # computed here: no request is sent
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._name(key)},
            ExpiresIn=max(1, int(expires)),
        )
        return url

    async def _read_object(self, key: str, offset: int | None = 0) -> AsyncIterator[bytes]:
        """From byte `offset` (a ranged GET) to the end; nothing when `offset` is None."""
        if offset is None:
            return
        ranged = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = await asyncio.to_thread(
                self.client.get_object, Bucket=self.bucket, Key=self._name(key), **ranged
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

    async def open_at(self, key: str, offset: int) -> AsyncIterator[bytes]:
        size = await self.size(key)  # BlobNotFound now, before the caller starts a response
        return self._read_object(key, offset if offset < size else None)

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

    async def listing(self) -> AsyncIterator[list[Stored]]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix))
        while (page := await asyncio.to_thread(next, pages, None)) is not None:
            batch = [
                Stored(item["Key"][len(self.prefix) :], item["LastModified"].astimezone(UTC))
                for item in page.get("Contents", [])
                if _KEY.fullmatch(item["Key"][len(self.prefix) :])
            ]
            if batch:
                yield batch

    async def remove_partial(self, before: datetime) -> int:
        """Also aborts multipart uploads started before `before` - MULTIPART_MAX_AGE, and
        removes the spool files of puts whose process died."""
        spool_dir = Path(self.spool_dir or tempfile.gettempdir())
        removed = await asyncio.to_thread(remove_unused_files, spool_dir, [S3_SPOOL], before)
        paginator = self.client.get_paginator("list_multipart_uploads")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix))
        while (page := await asyncio.to_thread(next, pages, None)) is not None:
            for upload in page.get("Uploads", []):
                name = upload["Key"]
                if not _KEY.fullmatch(name[len(self.prefix) :]):
                    continue  # not one of marid's
                if upload["Initiated"] >= before - MULTIPART_MAX_AGE:
                    continue
                await asyncio.to_thread(
                    self.client.abort_multipart_upload,
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload["UploadId"],
                )
                removed += 1
        return removed


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
    # Readable by the service's user alone (issue 11 row 18): blobs are other users' uploads.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        hold(out.fileno())
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


async def _file_chunks(path: Path, offset: int = 0) -> AsyncIterator[bytes]:
    source = await asyncio.to_thread(path.open, "rb")
    try:
        if offset:
            source.seek(offset)
        while chunk := await asyncio.to_thread(source.read, CHUNK_SIZE):
            yield chunk
    finally:
        source.close()


async def _blob_chunks(path: Path, key: str, offset: int = 0) -> AsyncIterator[bytes]:
    try:
        async for chunk in _file_chunks(path, offset):
            yield chunk
    except FileNotFoundError:  # deleted since `open` checked: only opening can raise this
        raise BlobNotFound(key) from None


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _skip(chunks: AsyncIterator[bytes], offset: int) -> AsyncIterator[bytes]:
    """`chunks` without their first `offset` bytes."""
    async for chunk in chunks:
        if offset >= len(chunk):
            offset -= len(chunk)
            continue
        yield chunk[offset:]
        offset = 0


def hold(fd: int) -> None:
    """Mark the open file `fd` as in use until it is closed: `remove_if_unused` skips it.

    A shared flock, so several holders never block each other; the kernel drops it when
    the process dies, kill -9 included. Where the file system has no locks, the age alone
    protects the file.
    """
    with suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)


def remove_if_unused(path: Path, before: datetime) -> bool:
    """Remove the regular file at `path` if it was last written before `before` and no live
    process holds it (`hold`); returns whether it did. Never follows a symbolic link."""
    try:
        return _remove_if_unused(path, before)
    except (FileNotFoundError, PermissionError):
        return False  # gone meanwhile, or another user's: not ours to remove
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
        return False


def _remove_if_unused(path: Path, before: datetime) -> bool:
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode) or info.st_mtime >= before.timestamp():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # held by a live process
        except OSError:
            pass  # no locks on this file system: the age alone decides
        if os.fstat(fd).st_ino != info.st_ino:
            return False  # replaced since it was looked at
        path.unlink()
        return True
    finally:
        os.close(fd)


def remove_unused_files(directory: Path, names: list[tuple[str, str]], before: datetime) -> int:
    """`remove_if_unused` on each file of `directory` named `<prefix>…<suffix>` for a pair of
    `names`; returns how many were removed. A missing directory holds nothing."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if any(entry.name.startswith(p) and entry.name.endswith(s) for p, s in names):
            removed += remove_if_unused(Path(entry.path), before)
    return removed


def _shards(root: Path) -> list[Path]:
    """The shard directories of an fs store (`<root>/<two hex digits>`)."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    shard = re.compile(r"[0-9a-f]{2}")
    return sorted(Path(e.path) for e in entries if shard.fullmatch(e.name) and e.is_dir())


def _complete(shard: Path) -> list[Stored]:
    found = []
    for entry in _entries(shard):
        if _KEY.fullmatch(entry.name) and entry.name[:2] == shard.name:
            with suppress(FileNotFoundError):  # deleted since the directory was read
                modified = datetime.fromtimestamp(entry.stat().st_mtime, UTC)
                found.append(Stored(entry.name, modified))
    return found


def _partial(shard: Path) -> list[Path]:
    part = re.compile(r"\.[0-9a-f]{32}\.part")
    return [Path(entry.path) for entry in _entries(shard) if part.fullmatch(entry.name)]


def _entries(directory: Path) -> Iterator[os.DirEntry[str]]:
    """The regular files of `directory`; none if it vanished."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        with suppress(FileNotFoundError):
            if entry.is_file(follow_symlinks=False):
                yield entry
