"""Images: qemu disks and docker image archives for the drivers (docs/api.md §12, docs/manifest.md
§9.2).

An image's content lives in the blob store under `blob_key`: at once for an upload, once its
download has finished for a download (§12.3), whose progress `image_downloads` records.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from marid import archives, namespaces, outbound, users
from marid.blobs import Blob
from marid.crypto import Cipher
from marid.listing import Listing
from marid.namespaces import Namespace
from marid.times import rfc3339
from marid.uploads import Content, size_text
from marid.users import User
from marid.validation import Errors, ValidationError

DRIVERS = ("qemu", "docker")
# What `GET /images/:id` serves each driver's content as (docs/api.md §12.4).
CONTENT_TYPES = {"qemu": "application/x-qemu-disk", "docker": "application/x-tar"}
QEMU_NAME = re.compile(r"[A-Za-z0-9_-]+")
# A docker reference (docs/manifest.md §9.2): lowercase components separated by `.`, `_` or `-`,
# joined by `/`, then an optional tag.
_COMPONENT = r"[a-z0-9]+(?:[._-][a-z0-9]+)*"
DOCKER_NAME = re.compile(
    rf"{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
)
UNIQUE_NAME = ("images_user_id_name_key", "images_namespace_id_name_key")
DOWNLOAD_SCHEMES = ("http", "https", "sftp")
REDACTED = "xxxxx"
# Download errors (docs/api.md §12.3 fixes the first).
NOT_QCOW2 = "not a valid qcow2 file"
INTERRUPTED = "download interrupted by server restarts"


@dataclass(frozen=True)
class Download:
    source: str
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Image:
    id: int
    user_id: int
    author_id: int
    namespace_id: int | None
    driver: str
    name: str
    blob_key: str | None  # None until a download has finished
    size: int | None
    sha256: str | None
    created_at: datetime
    download: Download | None


@dataclass(frozen=True)
class DockerArchive:
    """An image's stored upload (a `docker save` archive or a QCOW2 disk), for the runner."""

    image_id: int
    blob_key: str
    sha256: str


def from_row(row: asyncpg.Record) -> Image:
    download = None
    if row["download_source"] is not None:
        download = Download(
            row["download_source"],
            row["download_error"],
            row["download_created_at"],
            row["download_started_at"],
            row["download_finished_at"],
        )
    return Image(
        row["id"],
        row["user_id"],
        row["author_id"],
        row["namespace_id"],
        row["driver"],
        row["name"],
        row["blob_key"],
        row["size"],
        row["sha256"],
        row["created_at"],
        download,
    )


def check_driver(driver: str | None, errors: Errors) -> str | None:
    """The driver asked for (default qemu); None when it is invalid (or was not a string)."""
    if errors.has("driver"):
        return None
    if not driver:
        return "qemu"
    if driver not in DRIVERS:
        errors.add("driver", "Driver must be qemu or docker")
        return None
    return driver


def check_name(name: str | None, driver: str | None, errors: Errors) -> None:
    """The shape rules of `name` for `driver` (None: unknown, only `required` applies)."""
    if not name:
        errors.add("name", "Name field required")
    elif driver == "qemu" and not QEMU_NAME.fullmatch(name):
        errors.add("name", "Name can only have letters, numbers, dashes, and underscores")
    elif driver == "docker" and not DOCKER_NAME.fullmatch(name):
        errors.add("name", "Name is not a valid docker image reference")


async def check_content(
    content: Content, driver: str | None, errors: Errors, max_size: int
) -> None:
    """The `file` rules of an upload, in order: present, the driver's format, the limit."""
    if content.missing:
        errors.add("file", "File field required")
        return
    if driver == "qemu" and not archives.is_qcow2(content.head):
        errors.add("file", "File not a valid QCOW2 file format")
    # An oversized archive was not kept whole, so only its size is reported.
    if (
        driver == "docker"
        and content.path is not None
        and not await asyncio.to_thread(archives.is_docker_archive, content.path)
    ):
        errors.add("file", "File not a valid docker image archive")
    if content.too_large:
        errors.add("file", f"File too large, cannot exceed {size_text(max_size)}")


def check_download_url(
    url: str, driver: str | None, errors: Errors, policy: outbound.Policy
) -> None:
    """The `download_url` rules (docs/api.md §12.3, docs/manifest.md §9.2). A host that is a
    literal address `policy` refuses, in any spelling, is refused here; a name is checked when
    the download connects (api/downloads.py)."""
    if driver == "docker":
        errors.add("download_url", "Download URL is not supported for docker images")
        return
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # e.g. an unbalanced `[` in the host
        errors.add("download_url", "Download URL invalid url scheme")
        return
    scheme = parts.scheme.lower()
    if scheme not in DOWNLOAD_SCHEMES:
        errors.add("download_url", "Download URL invalid url scheme")
    elif scheme == "sftp" and parts.password is None:
        errors.add("download_url", "Download URL missing password from SFTP URL")
    elif host:
        try:
            policy.check_host(host)
        except outbound.Refused as exc:
            errors.add("download_url", f"Download URL {exc}")


def redact(url: str) -> str:
    """`url` with any password replaced by `xxxxx`, as `download.source` shows it."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{host}"))


def seal_url(cipher: Cipher, image_id: int, url: str) -> bytes:
    """The download URL encrypted for `image_downloads.secret_url` (bound to the image)."""
    return cipher.encrypt_text(url, associated_data=_url_context(image_id))


def open_url(cipher: Cipher, image_id: int, secret: bytes) -> str:
    """The URL `seal_url` encrypted; raises DecryptionError."""
    return cipher.decrypt_text(secret, associated_data=_url_context(image_id))


def _url_context(image_id: int) -> bytes:
    return f"image_downloads.secret_url:{image_id}".encode()


class NotQcow2(Exception):
    """Downloaded content that does not start with the QCOW2 magic."""


async def qcow2_only(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """`chunks` passed on, raising NotQcow2 as soon as they do not start with the magic."""
    size = len(archives.QCOW2_MAGIC)
    head = b""
    async for chunk in chunks:
        if len(head) < size:
            head += chunk[: size - len(head)]
            if len(head) == size and not archives.is_qcow2(head):
                raise NotQcow2()
        yield chunk
    if not archives.is_qcow2(head):
        raise NotQcow2()


async def name_taken(
    conn: asyncpg.Connection, owner_id: int, ns: Namespace | None, name: str
) -> bool:
    """Whether `name` is used by the owner's un-namespaced images or in `ns`."""
    return bool(
        await conn.fetchval(
            """
            SELECT EXISTS (
                SELECT 1 FROM images WHERE name = $3 AND CASE WHEN $2::bigint IS NULL
                    THEN namespace_id IS NULL AND NOT detached AND user_id = $1
                    ELSE namespace_id = $2 END
            )
            """,
            owner_id,
            ns.id if ns else None,
            name,
        )
    )


async def create(
    conn: asyncpg.Connection,
    author: User,
    ns: Namespace | None,
    driver: str,
    name: str,
    blob: Blob | None,
) -> int:
    """Insert an image (with its content, or None for a download); its id. Raises
    ValidationError for a taken name. The caller owns the transaction."""
    try:
        return int(
            await conn.fetchval(
                """
                INSERT INTO images
                    (user_id, author_id, namespace_id, driver, name, blob_key, size, sha256)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                RETURNING id
                """,
                ns.user_id if ns else author.id,
                author.id,
                ns.id if ns else None,
                driver,
                name,
                blob.key if blob else None,
                blob.size if blob else None,
                blob.sha256 if blob else None,
            )
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name in UNIQUE_NAME:
            raise ValidationError({"name": ["Name already exists"]}) from exc
        raise


async def add_download(
    conn: asyncpg.Connection, image_id: int, source: str, secret_url: bytes
) -> None:
    """Record a pending download: `source` is shown, `secret_url` the encrypted URL."""
    await conn.execute(
        "INSERT INTO image_downloads (image_id, source, secret_url) VALUES ($1, $2, $3)",
        image_id,
        source,
        secret_url,
    )


async def get(conn: asyncpg.Connection, image_id: int) -> Image | None:
    row = await conn.fetchrow("SELECT * FROM images_with_download WHERE id = $1", image_id)
    return from_row(row) if row else None


async def delete(conn: asyncpg.Connection, image: Image) -> str | None:
    """Delete the row (and its download); the blob key to delete once the transaction has
    committed. Read here, not from `image`: a download may have finished meanwhile."""
    key: str | None = await conn.fetchval(
        "DELETE FROM images WHERE id = $1 RETURNING blob_key", image.id
    )
    return key


async def count(conn: asyncpg.Connection, listing: Listing, search: str) -> int:
    """How many images of `listing` have a name containing `search`."""
    return int(
        await conn.fetchval(
            """
            SELECT count(*) FROM images
            WHERE ($1::bigint IS NULL
                   OR (namespace_id IS NULL AND user_id = $1)
                   OR namespace_id IN (SELECT namespace_id FROM namespace_members
                                       WHERE user_id = $1))
              AND ($2::bigint IS NULL OR namespace_id = $2)
              AND strpos(lower(name), lower($3)) > 0
            """,
            listing.visible_to,
            listing.namespace_id,
            search,
        )
    )


async def page(
    conn: asyncpg.Connection, listing: Listing, search: str, offset: int, limit: int
) -> list[Image]:
    """One page of the images of `listing` (docs/api.md §12.2, §8.8) whose name contains
    `search`, ordered by name."""
    rows = await conn.fetch(
        """
        SELECT * FROM images_with_download
        WHERE ($1::bigint IS NULL
               OR (namespace_id IS NULL AND user_id = $1)
               OR namespace_id IN (SELECT namespace_id FROM namespace_members
                                   WHERE user_id = $1))
          AND ($2::bigint IS NULL OR namespace_id = $2)
          AND strpos(lower(name), lower($3)) > 0
        ORDER BY name, id
        OFFSET $4 LIMIT $5
        """,
        listing.visible_to,
        listing.namespace_id,
        search,
        offset,
        limit,
    )
    return [from_row(row) for row in rows]


def download_json(download: Download | None) -> dict[str, Any] | None:
    if download is None:
        return None
    return {
        "source": download.source,
        "error": download.error,
        "created_at": rfc3339(download.created_at),
        "started_at": rfc3339(download.started_at),
        "finished_at": rfc3339(download.finished_at),
    }


async def to_json(
    conn: asyncpg.Connection, found: list[Image], api_url: str
) -> list[dict[str, Any]]:
    """Image entities (docs/api.md §12.1), their users and namespaces loaded in two queries."""
    people = await users.by_ids(conn, {i.user_id for i in found} | {i.author_id for i in found})
    spaces = await namespaces.by_ids(conn, {i.namespace_id for i in found if i.namespace_id})
    entities = []
    for image in found:
        ns = spaces.get(image.namespace_id) if image.namespace_id else None
        entities.append(
            {
                "id": image.id,
                "author_id": image.author_id,
                "user_id": image.user_id,
                "namespace_id": image.namespace_id,
                "driver": image.driver,
                "name": image.name,
                "created_at": rfc3339(image.created_at),
                "url": f"{api_url}/images/{image.id}",
                "author": users.to_json(people[image.author_id]),
                "user": users.to_json(people[image.user_id]),
                "namespace": namespaces.to_json(ns, api_url) if ns else None,
                "download": download_json(image.download),
            }
        )
    return entities


async def claim_download(conn: asyncpg.Connection, image_id: int, lease: float) -> bytes | None:
    """Mark a pending download started (again) for `lease` seconds; its encrypted URL, or None
    when it is gone, finished, or running elsewhere under a lease."""
    secret: bytes | None = await conn.fetchval(
        """
        UPDATE image_downloads
        SET started_at = now(), attempts = attempts + 1,
            lease_expires_at = now() + make_interval(secs => $2)
        WHERE image_id = $1 AND finished_at IS NULL
          AND (lease_expires_at IS NULL OR lease_expires_at < now())
        RETURNING secret_url
        """,
        image_id,
        lease,
    )
    return secret


async def renew_download(conn: asyncpg.Connection, image_id: int, lease: float) -> None:
    """Extend the download's lease to `lease` seconds from now (0 gives it up)."""
    await conn.execute(
        """
        UPDATE image_downloads SET lease_expires_at = now() + make_interval(secs => $2)
        WHERE image_id = $1 AND finished_at IS NULL
        """,
        image_id,
        lease,
    )


async def finish_download(
    conn: asyncpg.Connection, image_id: int, blob: Blob | None, error: str | None
) -> bool:
    """Record the end of a download, forgetting its URL; True when `blob` became the image's
    content (else the caller deletes it). The caller owns the transaction."""
    finished = await conn.fetchval(
        """
        UPDATE image_downloads
        SET error = $2, finished_at = now(), secret_url = NULL, lease_expires_at = NULL
        WHERE image_id = $1 AND finished_at IS NULL
        RETURNING image_id
        """,
        image_id,
        error,
    )
    if finished is None or blob is None:
        return False
    kept = await conn.fetchval(
        """
        UPDATE images SET blob_key = $2, size = $3, sha256 = $4
        WHERE id = $1 AND blob_key IS NULL
        RETURNING id
        """,
        image_id,
        blob.key,
        blob.size,
        blob.sha256,
    )
    return kept is not None


async def pending_downloads(conn: asyncpg.Connection) -> list[tuple[int, int]]:
    """(image id, attempts so far) of every unfinished download no process holds a lease on."""
    rows = await conn.fetch(
        """
        SELECT image_id, attempts FROM image_downloads
        WHERE finished_at IS NULL AND (lease_expires_at IS NULL OR lease_expires_at < now())
        ORDER BY image_id
        """
    )
    return [(row["image_id"], row["attempts"]) for row in rows]


async def find_docker_image(
    conn: asyncpg.Connection, owner_id: int, namespace_id: int | None, name: str
) -> DockerArchive | None:
    """docs/manifest.md §9.2 image resolution, step 1, for the runner: the `docker` image named
    exactly `name` in the build's namespace or, for a build without one, among its owner's
    personal (un-namespaced, not detached) images."""
    return await find_upload(conn, "docker", owner_id, namespace_id, name)


async def find_upload(
    conn: asyncpg.Connection, driver: str, owner_id: int, namespace_id: int | None, name: str
) -> DockerArchive | None:
    """The stored upload of `driver` named exactly `name` a build may use: in the build's
    namespace or, for a build without one, among its owner's personal (un-namespaced, not
    detached) images (docs/manifest.md §9.2, §9.6)."""
    row = await conn.fetchrow(
        """
        SELECT id, blob_key, sha256 FROM images
        WHERE driver = $4 AND name = $3 AND blob_key IS NOT NULL
          AND CASE WHEN $2::bigint IS NULL
              THEN namespace_id IS NULL AND NOT detached AND user_id = $1
              ELSE namespace_id = $2 END
        """,
        owner_id,
        namespace_id,
        name,
        driver,
    )
    return DockerArchive(row["id"], row["blob_key"], row["sha256"]) if row else None
