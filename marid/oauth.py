"""Authorization codes of the OAuth flow (docs/api.md §16): single use, 10 minutes, stored
hashed."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from marid.users import User

CODE_LIFETIME = timedelta(minutes=10)


@dataclass(frozen=True)
class Code:
    """A claimed, still valid code: the app, user and canonical scope it is bound to."""

    id: int
    app_id: int
    user_id: int
    scope: str
    redirect_uri: str


def new_code() -> str:
    return secrets.token_hex(16)


def digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


async def save(
    conn: asyncpg.Connection, code: str, app_id: int, user: User, scope: str, redirect_uri: str
) -> None:
    """Store a freshly issued code."""
    await conn.execute(
        """
        INSERT INTO oauth_codes (digest, app_id, user_id, scope, redirect_uri, expires_at)
        VALUES ($1, $2, $3, $4, $5, now() + $6::interval)
        """,
        digest(code),
        app_id,
        user.id,
        scope,
        redirect_uri,
        CODE_LIFETIME,
    )


async def find_usable(conn: asyncpg.Connection, code: str, app_id: int) -> Code | None:
    """The unused, unexpired code issued to `app_id`, locked until the caller's transaction
    ends so that a concurrent exchange of the same code waits and then finds it used."""
    row = await conn.fetchrow(
        """
        SELECT id, app_id, user_id, scope, redirect_uri FROM oauth_codes
        WHERE digest = $1 AND app_id = $2 AND NOT used AND expires_at > now()
        FOR UPDATE
        """,
        digest(code),
        app_id,
    )
    return Code(**row) if row else None


async def mark_used(conn: asyncpg.Connection, code_id: int) -> None:
    await conn.execute("UPDATE oauth_codes SET used = true WHERE id = $1", code_id)


async def record_token(conn: asyncpg.Connection, code_id: int, token_digest: str) -> None:
    """Remember which token the code produced, so that a replay can revoke it."""
    await conn.execute(
        "UPDATE oauth_codes SET token_digest = $2 WHERE id = $1", code_id, token_digest
    )


async def revoke_replayed(conn: asyncpg.Connection, code: str, app_id: int) -> bool:
    """A used code of `app_id` came back: delete the token issued for it, if it still exists
    (RFC 6749 §4.1.2). True when one was deleted. The caller owns the transaction, which must
    not be the refused exchange's (that one rolls back)."""
    result = await conn.execute(
        """
        DELETE FROM tokens WHERE digest = (
            SELECT token_digest FROM oauth_codes WHERE digest = $1 AND app_id = $2 AND used
        )
        """,
        digest(code),
        app_id,
    )
    return bool(result == "DELETE 1")


async def user_of(conn: asyncpg.Connection, code: Code) -> User | None:
    row = await conn.fetchrow(
        "SELECT id, username, email, created_at FROM users WHERE id = $1", code.user_id
    )
    return User(**row) if row else None
