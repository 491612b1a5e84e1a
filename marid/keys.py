"""SSH keys: private keys placed into builds (docs/api.md §13, docs/manifest.md §5.5, §6.5).

The private key is stored only as an AES-GCM blob bound to its owner and name, and no entity
carries it. `private_key()`/`decrypt_key()` are for the runner: never put their result in a
response or a log line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from marid import namespaces, users
from marid.crypto import Cipher
from marid.listing import Listing
from marid.namespaces import Namespace
from marid.sshkeys import is_private_key
from marid.times import rfc3339
from marid.users import User
from marid.validation import Body, Errors, ValidationError

NAME = re.compile(r"[A-Za-z0-9._-]+")
WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Key:
    id: int
    user_id: int
    author_id: int
    namespace_id: int | None
    name: str
    key_sealed: bytes = field(repr=False)
    config: str
    created_at: datetime
    updated_at: datetime


def associated_data(owner_id: int, name: str) -> bytes:
    """What a key's blob is bound to: its owner (the namespace owner for a namespaced key) and
    its name, neither of which ever changes."""
    return f"ssh_key:{owner_id}:{name}".encode()


def seal(cipher: Cipher, owner_id: int, name: str, private_key: str) -> bytes:
    return cipher.encrypt_text(private_key, associated_data=associated_data(owner_id, name))


def decrypt_key(cipher: Cipher, owner_id: int, name: str, sealed: bytes) -> str:
    """The private key sealed for (`owner_id`, `name`); raises DecryptionError.

    A build snapshot that copies `key_sealed` must keep the source's owner id and name with it.
    """
    return cipher.decrypt_text(sealed, associated_data=associated_data(owner_id, name))


def private_key(cipher: Cipher, key: Key) -> str:
    """The private key text to write into a build (runner only)."""
    return decrypt_key(cipher, key.user_id, key.name, key.key_sealed)


def normalise_name(name: str) -> str:
    """docs/api.md §13.3: each run of whitespace becomes `_`, before validation and storage."""
    return WHITESPACE.sub("_", name)


@dataclass(frozen=True)
class KeyForm:
    """A POST /keys body after its shape checks (docs/api.md §13.3).

    `name` and `key` are None when missing or malformed; `errors` holds what failed so far and
    is raised by create() together with the rules that need the database. parse() parses the
    key (slow for big RSA keys): run it off the event loop.
    """

    namespace: str | None
    name: str | None
    key: str | None = field(repr=False)
    config: str
    errors: Errors = field(repr=False)

    @classmethod
    def parse(cls, body: Body) -> KeyForm:
        namespace = body.string("namespace", "Namespace")
        # Normalising never empties a name, so "required" means the same before and after.
        name = body.required_string("name", "Name")
        if name is not None:
            name = normalise_name(name)
            if not NAME.fullmatch(name):
                body.errors.add(
                    "name", "Name can only have letters, numbers, dots, dashes, and underscores"
                )
                name = None
        key = body.string("key", "Key")
        key = key.replace("\r", "") if key else None
        if not key:
            if not body.errors.has("key"):
                body.errors.add("key", "Key field required")
            key = None
        elif not is_private_key(key):
            body.errors.add("key", "Key is not a valid SSH private key")
            key = None
        config = check_config(body)
        return cls(namespace or None, name, key, config or "", body.errors)


def check_config(body: Body) -> str | None:
    """The optional `config` string (docs/api.md §13.3, §13.5)."""
    return body.string("config", "Config")


async def create(conn: asyncpg.Connection, cipher: Cipher, user: User, form: KeyForm) -> Key:
    """Insert a key authored by `user`; raises ValidationError with every failed rule.

    The caller owns the transaction (namespaces created on the way roll back with it).
    """
    errors = form.errors
    ns = await namespaces.resolve(conn, user, form.namespace, errors)
    owner_id = ns.user_id if ns else user.id
    # §1.4: uniqueness is not checked when the namespace rule failed.
    if not errors.has("namespace") and form.name and await _taken(conn, owner_id, ns, form.name):
        errors.add("name", "Name already exists")
    errors.raise_if_any()
    assert form.name is not None and form.key is not None
    try:
        row = await conn.fetchrow(
            """
            INSERT INTO ssh_keys (user_id, author_id, namespace_id, name, key_sealed, config)
            VALUES ($1, $2, $3, $4, $5, $6)
            RETURNING id, user_id, author_id, namespace_id, name, key_sealed, config,
                      created_at, updated_at
            """,
            owner_id,
            user.id,
            ns.id if ns else None,
            form.name,
            seal(cipher, owner_id, form.name, form.key),
            form.config,
        )
    except asyncpg.UniqueViolationError as exc:  # a concurrent request took the name
        if exc.constraint_name in ("ssh_keys_user_id_name_key", "ssh_keys_namespace_id_name_key"):
            raise ValidationError({"name": ["Name already exists"]}) from exc
        raise
    return Key(**row)


async def _taken(conn: asyncpg.Connection, owner_id: int, ns: Namespace | None, name: str) -> bool:
    """Whether the name is in use, checked before inserting so that the error is reported with
    the others; the unique indexes still decide a race."""
    return bool(
        await conn.fetchval(
            """
            SELECT EXISTS (
                SELECT 1 FROM ssh_keys WHERE name = $3 AND CASE
                    WHEN $2::bigint IS NULL THEN user_id = $1 AND namespace_id IS NULL
                                                 AND NOT detached
                    ELSE namespace_id = $2 END
            )
            """,
            owner_id,
            ns.id if ns else None,
            name,
        )
    )


async def get(conn: asyncpg.Connection, key_id: int) -> Key | None:
    row = await conn.fetchrow(
        """
        SELECT id, user_id, author_id, namespace_id, name, key_sealed, config,
               created_at, updated_at
        FROM ssh_keys WHERE id = $1
        """,
        key_id,
    )
    return Key(**row) if row else None


async def update_config(conn: asyncpg.Connection, key: Key, config: str | None) -> Key:
    """PATCH /keys/:id (docs/api.md §13.5): a new `config` unless None or ""; always
    `updated_at`."""
    row = await conn.fetchrow(
        """
        UPDATE ssh_keys SET config = coalesce($2, config), updated_at = now()
        WHERE id = $1
        RETURNING id, user_id, author_id, namespace_id, name, key_sealed, config,
                  created_at, updated_at
        """,
        key.id,
        config or None,
    )
    assert row is not None
    return Key(**row)


async def delete(conn: asyncpg.Connection, key: Key) -> None:
    await conn.execute("DELETE FROM ssh_keys WHERE id = $1", key.id)


async def count(conn: asyncpg.Connection, listing: Listing, search: str) -> int:
    """How many keys of `listing` have a name containing `search`."""
    return int(
        await conn.fetchval(
            """
            SELECT count(*) FROM ssh_keys k
            WHERE ($1::bigint IS NULL
                   OR (k.namespace_id IS NULL AND k.user_id = $1)
                   OR k.namespace_id IN (SELECT namespace_id FROM namespace_members
                                         WHERE user_id = $1))
              AND ($2::bigint IS NULL OR k.namespace_id = $2)
              AND strpos(lower(k.name), lower($3)) > 0
            """,
            listing.visible_to,
            listing.namespace_id,
            search,
        )
    )


async def page(
    conn: asyncpg.Connection, listing: Listing, search: str, offset: int, limit: int
) -> list[Key]:
    """One page of the keys of `listing` (docs/api.md §13.2, §8.8) whose name contains `search`,
    by name."""
    rows = await conn.fetch(
        """
        SELECT id, user_id, author_id, namespace_id, name, key_sealed, config,
               created_at, updated_at
        FROM ssh_keys k
        WHERE ($1::bigint IS NULL
               OR (k.namespace_id IS NULL AND k.user_id = $1)
               OR k.namespace_id IN (SELECT namespace_id FROM namespace_members
                                     WHERE user_id = $1))
          AND ($2::bigint IS NULL OR k.namespace_id = $2)
          AND strpos(lower(k.name), lower($3)) > 0
        ORDER BY k.name, k.id
        OFFSET $4 LIMIT $5
        """,
        listing.visible_to,
        listing.namespace_id,
        search,
        offset,
        limit,
    )
    return [Key(**row) for row in rows]


async def to_json(conn: asyncpg.Connection, found: list[Key], api_url: str) -> list[dict[str, Any]]:
    """Key entities (docs/api.md §13.1); the private key is never part of one."""
    people = await users.by_ids(conn, {k.user_id for k in found} | {k.author_id for k in found})
    spaces = await namespaces.by_ids(conn, {k.namespace_id for k in found if k.namespace_id})
    return [
        {
            "id": k.id,
            "author_id": k.author_id,
            "user_id": k.user_id,
            "namespace_id": k.namespace_id,
            "name": k.name,
            "config": k.config,
            "created_at": rfc3339(k.created_at),
            "updated_at": rfc3339(k.updated_at),
            "url": f"{api_url}/keys/{k.id}",
            "author": users.to_json(people[k.author_id]),
            "user": users.to_json(people[k.user_id]),
            "namespace": (
                namespaces.to_json(spaces[k.namespace_id], api_url) if k.namespace_id else None
            ),
        }
        for k in found
    ]
