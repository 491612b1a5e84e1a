"""Variables: environment variables placed into builds (docs/api.md §15, docs/manifest.md §5.5,
§6.3).

An unmasked value is stored as text. A masked value is stored only as an AES-GCM blob whose
associated data binds it to its owner and key, so a blob copied onto another row does not
decrypt. Its plaintext leaves this module only through `plaintext()`/`decrypt_value()`, which
are for the runner: never put their result in a response or a log line.
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
from marid.times import rfc3339
from marid.users import User
from marid.validation import Body, Errors, ValidationError

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MASK = "xxxxxx"
MIN_MASKED_LENGTH = 6


@dataclass(frozen=True)
class Variable:
    id: int
    user_id: int
    author_id: int
    namespace_id: int | None
    key: str
    masked: bool
    value: str | None  # unmasked variables only
    value_sealed: bytes | None = field(repr=False)  # masked variables only
    created_at: datetime


def associated_data(owner_id: int, key: str) -> bytes:
    """What a masked value's blob is bound to: its owner (the namespace owner for a
    namespaced variable, docs/api.md §3.1) and its key. Neither changes, not even when a
    namespace is deleted."""
    return f"variable:{owner_id}:{key}".encode()


def seal(cipher: Cipher, owner_id: int, key: str, value: str) -> bytes:
    """The stored form of a masked value."""
    return cipher.encrypt_text(value, associated_data=associated_data(owner_id, key))


def decrypt_value(cipher: Cipher, owner_id: int, key: str, sealed: bytes) -> str:
    """The plaintext of a masked value sealed for (`owner_id`, `key`); raises DecryptionError.

    A build snapshot that copies `value_sealed` must keep the source's owner id and key with it.
    """
    return cipher.decrypt_text(sealed, associated_data=associated_data(owner_id, key))


def plaintext(cipher: Cipher, variable: Variable) -> str:
    """The value a build's environment gets (runner only)."""
    if not variable.masked:
        assert variable.value is not None
        return variable.value
    assert variable.value_sealed is not None
    return decrypt_value(cipher, variable.user_id, variable.key, variable.value_sealed)


@dataclass(frozen=True)
class VariableForm:
    """A POST /variables body after its shape checks (docs/api.md §15.3).

    `key` and `value` are None when missing or malformed; `errors` holds what failed so far and
    is raised by create() together with the rules that need the database.
    """

    namespace: str | None
    key: str | None
    value: str | None = field(repr=False)  # maybe a secret
    masked: bool
    errors: Errors = field(repr=False)

    @classmethod
    def parse(cls, body: Body) -> VariableForm:
        namespace = body.string("namespace", "Namespace")
        key = body.required_string("key", "Key")
        if key is not None and not KEY.fullmatch(key):
            body.errors.add(
                "key",
                "Key can only have letters, numbers, and underscores,"
                " and cannot start with a number",
            )
            key = None
        value = body.required_string("value", "Value")
        masked = body.boolean("mask", "Mask")
        # NUL and lone surrogates never get here: api/http.py refuses them in any JSON body.
        if value is not None and masked and len(value) < MIN_MASKED_LENGTH:
            body.errors.add(
                "value", f"Value cannot be shorter than {MIN_MASKED_LENGTH} characters in length"
            )
        return cls(namespace or None, key, value, bool(masked), body.errors)


async def create(
    conn: asyncpg.Connection, cipher: Cipher, user: User, form: VariableForm
) -> Variable:
    """Insert a variable authored by `user`; raises ValidationError with every failed rule.

    The caller owns the transaction (namespaces created on the way roll back with it).
    """
    errors = form.errors
    ns = await namespaces.resolve(conn, user, form.namespace, errors)
    owner_id = ns.user_id if ns else user.id
    # §1.4: uniqueness is not checked when the namespace rule failed.
    if not errors.has("namespace") and form.key and await _taken(conn, owner_id, ns, form.key):
        errors.add("key", "Key already exists")
    errors.raise_if_any()
    assert form.key is not None and form.value is not None
    sealed = seal(cipher, owner_id, form.key, form.value) if form.masked else None
    try:
        row = await conn.fetchrow(
            """
            INSERT INTO variables
                (user_id, author_id, namespace_id, key, masked, value, value_sealed)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            RETURNING id, user_id, author_id, namespace_id, key, masked, value, value_sealed,
                      created_at
            """,
            owner_id,
            user.id,
            ns.id if ns else None,
            form.key,
            form.masked,
            None if form.masked else form.value,
            sealed,
        )
    except asyncpg.UniqueViolationError as exc:  # a concurrent request took the key
        if exc.constraint_name in ("variables_user_id_key_key", "variables_namespace_id_key_key"):
            raise ValidationError({"key": ["Key already exists"]}) from exc
        raise
    return Variable(**row)


async def _taken(conn: asyncpg.Connection, owner_id: int, ns: Namespace | None, key: str) -> bool:
    """Whether the key is in use, checked before inserting so that the error is reported with
    the others; the unique indexes still decide a race."""
    return bool(
        await conn.fetchval(
            """
            SELECT EXISTS (
                SELECT 1 FROM variables WHERE key = $3 AND CASE
                    WHEN $2::bigint IS NULL THEN user_id = $1 AND namespace_id IS NULL
                                                 AND NOT detached
                    ELSE namespace_id = $2 END
            )
            """,
            owner_id,
            ns.id if ns else None,
            key,
        )
    )


async def get(conn: asyncpg.Connection, variable_id: int) -> Variable | None:
    row = await conn.fetchrow(
        """
        SELECT id, user_id, author_id, namespace_id, key, masked, value, value_sealed, created_at
        FROM variables WHERE id = $1
        """,
        variable_id,
    )
    return Variable(**row) if row else None


async def delete(conn: asyncpg.Connection, variable: Variable) -> None:
    await conn.execute("DELETE FROM variables WHERE id = $1", variable.id)


async def count(conn: asyncpg.Connection, listing: Listing, search: str) -> int:
    """How many variables of `listing` have a key containing `search`."""
    return int(
        await conn.fetchval(
            """
            SELECT count(*) FROM variables v
            WHERE ($1::bigint IS NULL
                   OR (v.namespace_id IS NULL AND v.user_id = $1)
                   OR v.namespace_id IN (SELECT namespace_id FROM namespace_members
                                         WHERE user_id = $1))
              AND ($2::bigint IS NULL OR v.namespace_id = $2)
              AND strpos(lower(v.key), lower($3)) > 0
            """,
            listing.visible_to,
            listing.namespace_id,
            search,
        )
    )


async def page(
    conn: asyncpg.Connection, listing: Listing, search: str, offset: int, limit: int
) -> list[Variable]:
    """One page of the variables of `listing` (docs/api.md §15.2, §8.8) whose key contains
    `search`, by key."""
    rows = await conn.fetch(
        """
        SELECT id, user_id, author_id, namespace_id, key, masked, value, value_sealed, created_at
        FROM variables v
        WHERE ($1::bigint IS NULL
               OR (v.namespace_id IS NULL AND v.user_id = $1)
               OR v.namespace_id IN (SELECT namespace_id FROM namespace_members
                                     WHERE user_id = $1))
          AND ($2::bigint IS NULL OR v.namespace_id = $2)
          AND strpos(lower(v.key), lower($3)) > 0
        ORDER BY v.key, v.id
        OFFSET $4 LIMIT $5
        """,
        listing.visible_to,
        listing.namespace_id,
        search,
        offset,
        limit,
    )
    return [Variable(**row) for row in rows]


async def to_json(
    conn: asyncpg.Connection, found: list[Variable], api_url: str
) -> list[dict[str, Any]]:
    """Variable entities (docs/api.md §15.1): a masked value is always `xxxxxx`."""
    people = await users.by_ids(conn, {v.user_id for v in found} | {v.author_id for v in found})
    spaces = await namespaces.by_ids(conn, {v.namespace_id for v in found if v.namespace_id})
    return [
        {
            "id": v.id,
            "author_id": v.author_id,
            "user_id": v.user_id,
            "namespace_id": v.namespace_id,
            "key": v.key,
            "value": MASK if v.masked else v.value,
            "masked": v.masked,
            "created_at": rfc3339(v.created_at),
            "url": f"{api_url}/variables/{v.id}",
            "author": users.to_json(people[v.author_id]),
            "user": users.to_json(people[v.user_id]),
            "namespace": (
                namespaces.to_json(spaces[v.namespace_id], api_url) if v.namespace_id else None
            ),
        }
        for v in found
    ]
