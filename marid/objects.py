"""Objects: files placed into build environments (docs/api.md §14, docs/manifest.md §6.4).

The content lives in the blob store under `blob_key`; the row holds what the API shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from marid import namespaces, users
from marid.blobs import Blob
from marid.listing import Listing
from marid.namespaces import Namespace
from marid.times import rfc3339
from marid.users import User
from marid.validation import Errors, ValidationError

NAME = re.compile(r"[A-Za-z0-9._-]+")
UNIQUE_NAME = ("objects_user_id_name_key", "objects_namespace_id_name_key")


@dataclass(frozen=True)
class Object:
    id: int
    user_id: int
    author_id: int
    namespace_id: int | None
    name: str
    type: str
    size: int
    md5: str
    sha256: str
    blob_key: str
    created_at: datetime


def check_name(name: str | None, errors: Errors) -> None:
    """The shape rules of `name` (docs/api.md §14.3)."""
    if not name:
        errors.add("name", "Name field required")
    elif not NAME.fullmatch(name):
        errors.add("name", "Name can only have letters, numbers, dots, dashes, and underscores")


async def name_taken(
    conn: asyncpg.Connection, owner_id: int, ns: Namespace | None, name: str
) -> bool:
    """Whether `name` is used by the owner's un-namespaced objects or in `ns`."""
    return bool(
        await conn.fetchval(
            """
            SELECT EXISTS (
                SELECT 1 FROM objects WHERE name = $3 AND CASE WHEN $2::bigint IS NULL
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
    name: str,
    content_type: str,
    blob: Blob,
) -> Object:
    """Insert an object for stored content; raises ValidationError for a taken name.
    The caller owns the transaction."""
    try:
        row = await conn.fetchrow(
            """
            INSERT INTO objects
                (user_id, author_id, namespace_id, name, type, size, md5, sha256, blob_key)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            RETURNING id, user_id, author_id, namespace_id, name, type, size, md5, sha256,
                      blob_key, created_at
            """,
            ns.user_id if ns else author.id,
            author.id,
            ns.id if ns else None,
            name,
            content_type,
            blob.size,
            blob.md5,
            blob.sha256,
            blob.key,
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name in UNIQUE_NAME:
            raise ValidationError({"name": ["Name already exists"]}) from exc
        raise
    return Object(**row)


async def get(conn: asyncpg.Connection, object_id: int) -> Object | None:
    row = await conn.fetchrow(
        """
        SELECT id, user_id, author_id, namespace_id, name, type, size, md5, sha256, blob_key,
               created_at
        FROM objects WHERE id = $1
        """,
        object_id,
    )
    return Object(**row) if row else None


async def delete(conn: asyncpg.Connection, obj: Object) -> None:
    """Delete the row; the caller deletes the blob once the transaction has committed."""
    await conn.execute("DELETE FROM objects WHERE id = $1", obj.id)


async def count(conn: asyncpg.Connection, listing: Listing, search: str) -> int:
    """How many objects of `listing` have a name containing `search`."""
    return int(
        await conn.fetchval(
            """
            SELECT count(*) FROM objects
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
) -> list[Object]:
    """One page of the objects of `listing` (docs/api.md §14.2, §8.8) whose name contains
    `search`, ordered by name."""
    rows = await conn.fetch(
        """
        SELECT id, user_id, author_id, namespace_id, name, type, size, md5, sha256, blob_key,
               created_at
        FROM objects
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
    return [Object(**row) for row in rows]


async def to_json(
    conn: asyncpg.Connection, found: list[Object], api_url: str
) -> list[dict[str, Any]]:
    """Object entities (docs/api.md §14.1), their users and namespaces loaded in two queries."""
    people = await users.by_ids(conn, {o.user_id for o in found} | {o.author_id for o in found})
    spaces = await namespaces.by_ids(conn, {o.namespace_id for o in found if o.namespace_id})
    entities = []
    for obj in found:
        url = f"{api_url}/objects/{obj.id}"
        ns = spaces.get(obj.namespace_id) if obj.namespace_id else None
        entities.append(
            {
                "id": obj.id,
                "author_id": obj.author_id,
                "user_id": obj.user_id,
                "namespace_id": obj.namespace_id,
                "name": obj.name,
                "type": obj.type,
                "size": obj.size,
                "md5": obj.md5,
                "sha256": obj.sha256,
                "created_at": rfc3339(obj.created_at),
                "url": url,
                "builds_url": f"{url}/builds",
                "author": users.to_json(people[obj.author_id]),
                "user": users.to_json(people[obj.user_id]),
                "namespace": namespaces.to_json(ns, api_url) if ns else None,
            }
        )
    return entities
