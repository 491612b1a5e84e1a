"""Uploaded content for objects and images (docs/api.md §12.3, §14.3), independent of HTTP.

An upload is spooled to a temporary file while it arrives (never held in memory), refusing to
grow past the resource's limit; it reaches the blob store only once its checks pass, and a
request that fails after that deletes it again (`stored`). The spool file is held (`hold`)
while the request uses it, so the reaper (marid/reaper.py) removes only those of dead
processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from marid.blobs import Blob, BlobStore, hold
from marid.mime import SNIFF_LEN
from marid.validation import Errors

log = logging.getLogger(__name__)

UNITS = ("B", "KB", "MB", "GB")
SPOOL = ("marid-upload-", ".part")  # prefix and suffix of a spool file, in the temp directory


@dataclass
class Content:
    """What a request carried as its file: `head` is its first bytes (for sniffing and magic
    checks); `path` the whole content, None when it was missing, empty or too large."""

    head: bytes = b""
    path: Path | None = None
    too_large: bool = False
    sha256: str = ""  # of the whole content, lowercase hex; "" unless `path` is set
    held: int | None = None  # a descriptor holding `path` (marid.blobs.hold) until discarded

    @property
    def missing(self) -> bool:
        return not self.head

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
        if self.held is not None:
            os.close(self.held)
            self.held = None


def size_text(limit: int) -> str:
    """`limit` in the largest unit that divides it (1024 steps): 5 MiB is `5 MB`."""
    value, unit = limit, 0
    while unit < len(UNITS) - 1 and value and value % 1024 == 0:
        value, unit = value // 1024, unit + 1
    return f"{value} {UNITS[unit]}"


def check_file(content: Content, errors: Errors, max_size: int) -> None:
    """The `file` rules every upload shares: present, then within the limit."""
    if content.missing:
        errors.add("file", "File field required")
    elif content.too_large:
        errors.add("file", f"File too large, cannot exceed {size_text(max_size)}")


async def spool(chunks: AsyncIterable[bytes], max_size: int) -> Content:
    """Write `chunks` to a new temporary file, stopping (and removing it) past `max_size` > 0.

    The caller discards the returned content when done with it.
    """
    fd, name = tempfile.mkstemp(SPOOL[1], SPOOL[0])
    path = Path(name)
    content = Content(held=os.dup(fd))  # the same open file: its lock outlives `out`
    hold(fd)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                if len(content.head) < SNIFF_LEN:
                    content.head += chunk[: SNIFF_LEN - len(content.head)]
                size += len(chunk)
                if max_size and size > max_size:
                    content.too_large = True
                    break
                await asyncio.to_thread(_write, out, digest, chunk)
    except BaseException:
        # Not in a thread, so a second cancellation cannot skip it.
        path.unlink(missing_ok=True)  # noqa: ASYNC240
        content.discard()
        raise
    if content.missing or content.too_large:
        path.unlink(missing_ok=True)  # noqa: ASYNC240 (a cheap metadata call)
        content.discard()
    else:
        content.path = path
        content.sha256 = digest.hexdigest()
    return content


def _write(out: BinaryIO, digest: Any, chunk: bytes) -> None:
    digest.update(chunk)
    out.write(chunk)


@asynccontextmanager
async def stored(store: BlobStore, content: Content | None) -> AsyncIterator[Blob | None]:
    """Store `content` (None stores nothing) for the body of the block; the blob is deleted
    again if the block fails, e.g. a later validation error or a failed insert or commit."""
    if content is None or content.path is None:
        yield None
        return
    blob = await store.put_file(content.path)
    try:
        yield blob
    except BaseException:
        try:
            await store.delete(blob.key)
        except Exception:
            log.exception("could not delete blob %s of a failed upload", blob.key)
        raise
