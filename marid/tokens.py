"""Access tokens (docs/api.md §18): values shown once, stored as SHA-256 digests."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from marid import scopes
from marid.times import rfc3339
from marid.users import User
from marid.validation import Errors, ValidationError

PREFIX = "mrd_"


@dataclass(frozen=True)
class Token:
    id: int
    user_id: int
    name: str
    scope: str
    created_at: datetime
    last_used_at: datetime | None
    # The app a token was issued to through OAuth (docs/api.md §16); None for personal tokens.
    app_client_id: str | None = None
    app_name: str | None = None


@dataclass(frozen=True)
class Authenticated:
    """The result of a bearer token lookup: who, with what scope, through which token."""

    user: User
    scope: scopes.Scope
    token_id: int


def new_value() -> str:
    return PREFIX + secrets.token_hex(32)


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def to_json(token: Token, api_url: str) -> dict[str, Any]:
    """The Token entity of docs/api.md §18.1 (without the value)."""
    return {
        "id": token.id,
        "name": token.name,
        "scope": token.scope,
        "app": (
            {"client_id": token.app_client_id, "name": token.app_name}
            if token.app_client_id is not None
            else None
        ),
        "created_at": rfc3339(token.created_at),
        "last_used_at": rfc3339(token.last_used_at),
        "url": f"{api_url}/tokens/{token.id}",
    }


def check_new_token(
    name: Any, scope: Any, errors: Errors, limit: scopes.Scope | None = None
) -> scopes.Scope | None:
    """Record EXT b.3 shape errors for `name`/`scope` in `errors`; returns the parsed scope.

    `limit` is the authenticating token's scope: a token never mints more than it holds.
    """
    if name is not None and not isinstance(name, str):
        errors.add("name", "Name must be a string")
    elif not name:
        errors.add("name", "Name field required")
    elif len(name) > 255:
        errors.add("name", "Name cannot be longer than 255 characters in length")
    if scope is None:
        scope = ""
    if not isinstance(scope, str):
        errors.add("scope", "Scope must be a string")
        return None
    try:
        parsed = scopes.parse(scope)
    except scopes.ScopeError as exc:
        errors.add("scope", f"Scope {exc}")
        return None
    if limit is not None and not limit.covers(parsed):
        errors.add("scope", "Scope exceeds the scope of the authenticating token")
    return parsed


async def create(
    conn: asyncpg.Connection,
    user: User,
    name: str,
    scope: scopes.Scope,
    minted_with: int | None = None,
) -> tuple[Token, str]:
    """Insert a personal token; returns it with its value (the only time it is known).

    `minted_with` is the id of the token the request authenticated with: when that token came
    through an app (OAuth, or minted with such a token), the new one does too and is revoked
    with the app (issue 11 row 11)."""
    value = new_value()
    try:
        row = await conn.fetchrow(
            """
            INSERT INTO tokens (user_id, name, scope, digest, via_app_id)
            VALUES ($1, $2, $3, $4,
                    (SELECT coalesce(app_id, via_app_id) FROM tokens WHERE id = $5))
            RETURNING id, user_id, name, scope, created_at, last_used_at
            """,
            user.id,
            name,
            str(scope),
            digest(value),
            minted_with,
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "tokens_user_id_name_key":
            raise ValidationError({"name": ["Name already exists"]}) from exc
        raise
    return Token(**row), value


async def replace_for_app(
    conn: asyncpg.Connection, user: User, app_id: int, app_name: str, scope: str, value: str
) -> None:
    """Store `value` as `user`'s one token for the app (named after it); an earlier one is
    overwritten, so its value stops working (docs/api.md §16.3). The caller owns the transaction."""
    await conn.execute(
        """
        INSERT INTO tokens (user_id, name, scope, digest, app_id) VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (user_id, app_id) WHERE app_id IS NOT NULL
        DO UPDATE SET name = $2, scope = $3, digest = $4, created_at = now(), last_used_at = NULL
        """,
        user.id,
        app_name,
        scope,
        digest(value),
        app_id,
    )


async def authenticate(conn: asyncpg.Connection, value: str) -> Authenticated | None:
    """Look a bearer token up (one indexed query) and note its use at most once a minute."""
    if not value.startswith(PREFIX):
        return None
    row = await conn.fetchrow(
        """
        SELECT t.id AS token_id, t.scope,
               t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute' AS stale,
               u.id, u.username, u.email, u.created_at
        FROM tokens t JOIN users u ON u.id = t.user_id
        WHERE t.digest = $1
        """,
        digest(value),
    )
    if row is None:
        return None
    if row["stale"]:
        await conn.execute("UPDATE tokens SET last_used_at = now() WHERE id = $1", row["token_id"])
    user = User(row["id"], row["username"], row["email"], row["created_at"])
    return Authenticated(user, scopes.parse(row["scope"]), row["token_id"])


async def list_for(conn: asyncpg.Connection, user: User) -> list[Token]:
    rows = await conn.fetch(
        """
        SELECT t.id, t.user_id, t.name, t.scope, t.created_at, t.last_used_at,
               a.client_id AS app_client_id, a.name AS app_name
        FROM tokens t LEFT JOIN apps a ON a.id = t.app_id
        WHERE t.user_id = $1 ORDER BY t.created_at, t.id
        """,
        user.id,
    )
    return [Token(**row) for row in rows]


async def delete(conn: asyncpg.Connection, user: User, token_id: int) -> bool:
    """Revoke one of `user`'s tokens; False when there is no such token of theirs."""
    result = await conn.execute(
        "DELETE FROM tokens WHERE id = $1 AND user_id = $2", token_id, user.id
    )
    return bool(result == "DELETE 1")


async def delete_named(conn: asyncpg.Connection, user: User, name: str) -> bool:
    """Revoke `user`'s token called `name`; False when they have none of that name."""
    result = await conn.execute(
        "DELETE FROM tokens WHERE user_id = $1 AND name = $2", user.id, name
    )
    return bool(result == "DELETE 1")


async def rename(conn: asyncpg.Connection, token_id: int, old: str, new: str) -> bool:
    """Rename a token that is still called `old`; raises UniqueViolationError when its user
    has another token called `new`."""
    result = await conn.execute(
        "UPDATE tokens SET name = $3 WHERE id = $1 AND name = $2", token_id, old, new
    )
    return bool(result == "UPDATE 1")
