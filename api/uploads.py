"""Files in and out of the API: uploads read from raw or multipart bodies, stored content
streamed back (docs/api.md §12.3, §12.4, §14.3, §14.4).

Both directions stream: the app's 1 MiB `client_max_size` bounds JSON bodies only, so files
are read from `request.content` or the multipart reader chunk by chunk, never with
`request.read()` or `request.post()`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, web

from marid.api.http import UNTRUSTED_CONTENT, multipart_reader, next_part, query
from marid.blobs import BlobNotFound, BlobStore
from marid.logs import REQUEST_ID
from marid.uploads import Content, spool
from marid.validation import NotFound, RequestError

CHUNK_SIZE = 256 * 1024
# A form field (name, namespace, driver) is short; this only bounds memory.
MAX_FIELD = 64 * 1024
FILE = "file"


@dataclass
class Upload:
    """A request's text fields (first value of each wanted name) and its file."""

    fields: dict[str, str]
    content: Content = field(default_factory=Content)


@asynccontextmanager
async def receive(
    request: web.Request, names: tuple[str, ...], max_size: int
) -> AsyncIterator[Upload]:
    """The upload in `request`: `multipart/form-data` (fields and a `file` part, in any order)
    or anything else as the raw file with fields in the query string. Content past
    `max_size` (> 0) is not kept. The spooled file is removed when the block ends."""
    if request.content_type == "multipart/form-data":
        upload = await _multipart(request, names, max_size)
    else:
        fields = {name: value for name in names if (value := query(request, name)) is not None}
        upload = Upload(fields, await spool(request.content.iter_chunked(CHUNK_SIZE), max_size))
    try:
        yield upload
    finally:
        upload.content.discard()


async def _multipart(request: web.Request, names: tuple[str, ...], max_size: int) -> Upload:
    upload = Upload({})
    seen_file = False
    try:
        reader = await multipart_reader(request)
        while (part := await next_part(reader)) is not None:
            if isinstance(part, BodyPartReader) and part.name == FILE and not seen_file:
                seen_file = True
                upload.content = await spool(_chunks(part), max_size)
            elif isinstance(part, BodyPartReader) and part.name in names:
                upload.fields.setdefault(part.name, await _text(part))
            await part.release()  # skips what was not read: the rest of an oversized file
    except BaseException as exc:
        upload.content.discard()
        if isinstance(exc, ValueError):  # aiohttp's answer to a malformed body
            raise RequestError("Malformed multipart body") from None
        raise
    return upload


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK_SIZE):
        yield chunk


async def _text(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK_SIZE):
        data += chunk
        if len(data) > MAX_FIELD:
            raise RequestError("Request body too large", 413)
    text = data.decode("utf-8", errors="replace")
    if "\x00" in text:  # as api.http.query: PostgreSQL cannot store it
        raise RequestError(f"Form field {part.name} must not contain NUL characters")
    return text


async def send_blob(
    request: web.Request,
    store: BlobStore,
    key: str,
    content_type: str,
    size: int,
    extra: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Stream the blob under `key` as the response body, with `extra` headers; NotFound if it
    is missing."""
    try:
        chunks = await store.open(key)
    except BlobNotFound:
        raise NotFound() from None
    # The request-log middleware adds X-Request-Id too late for a prepared (streamed) response.
    headers = {
        "Content-Type": content_type,
        "X-Request-Id": REQUEST_ID.get(),
        **UNTRUSTED_CONTENT,
        **(extra or {}),
    }
    response = web.StreamResponse(headers=headers)
    response.content_length = size
    await response.prepare(request)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response
