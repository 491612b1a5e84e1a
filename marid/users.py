"""Users: creation rules (docs/configuration.md §2), password hashing and the User entity
(docs/api.md §6)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from marid.times import rfc3339
from marid.validation import Errors, ValidationError

USERNAME = re.compile(r"[A-Za-z0-9.-]+")
# scrypt: a slow, salted, memory-hard KDF from the standard library (~50 ms per check).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


@dataclass(frozen=True)
class User:
    id: int
    username: str
    email: str
    created_at: datetime


def to_json(user: User) -> dict[str, Any]:
    """The User entity of docs/api.md §6.1."""
    return {"email": user.email, "username": user.username, "created_at": rfc3339(user.created_at)}


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return _stored(salt, digest)


def _stored(salt: bytes, digest: bytes) -> str:
    encode = base64.b64encode
    return (
        f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${encode(salt).decode()}${encode(digest).decode()}"
    )


# An unknown user's password is checked against this, so that answer costs the same scrypt as a
# known user's (issue 11 row 10). Its digest is random, derived from no password: nothing matches.
DUMMY_HASH = _stored(secrets.token_bytes(16), secrets.token_bytes(64))


def verify_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def login(password: str, found: tuple[User, str] | None) -> User | None:
    """The user of `found` (from `password_hash_of`) if `password` is theirs, else None. Blocking:
    one scrypt whether or not the user exists (against DUMMY_HASH when not)."""
    stored = DUMMY_HASH if found is None else found[1]
    right = verify_password(password, stored)
    return found[0] if found is not None and right else None


def check_new_user(username: str | None, email: str | None, password: str | None) -> Errors:
    """The shape rules of `user create` (docs/configuration.md §2); uniqueness is checked on
    insert."""
    errors = Errors()
    if not email:
        errors.add("email", "Email field required")
    elif "@" not in email:
        errors.add("email", "Email invalid")
    if not username:
        errors.add("username", "Username field required")
    else:
        if not USERNAME.fullmatch(username):
            errors.add("username", "Username can only have letters, numbers, dots, and dashes")
        if not 3 <= len(username) <= 30:
            errors.add("username", "Username must be between 3 and 30 characters in length")
    if not password:
        errors.add("password", "Password field required")
    elif not 6 <= len(password) <= 60:
        errors.add("password", "Password must be between 6 and 60 characters in length")
    return errors


async def create(conn: asyncpg.Connection, username: str, email: str, password: str) -> User:
    """Insert a user; raises ValidationError. The caller owns the transaction."""
    check_new_user(username, email, password).raise_if_any()
    password_hash = hash_password(password)
    try:
        row = await conn.fetchrow(
            """
            INSERT INTO users (username, email, password_hash) VALUES ($1, $2, $3)
            RETURNING id, username, email, created_at
            """,
            username,
            email,
            password_hash,
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "users_username_key":
            raise ValidationError({"username": ["Username already exists"]}) from exc
        if exc.constraint_name == "users_email_key":
            raise ValidationError({"email": ["Email already exists"]}) from exc
        raise
    return User(**row)


async def set_password(conn: asyncpg.Connection, user: User, password: str) -> None:
    """Set the password; the user's web sessions end (signed in with the old one)."""
    await conn.execute(
        "UPDATE users SET password_hash = $2 WHERE id = $1", user.id, hash_password(password)
    )
    await conn.execute("DELETE FROM web_sessions WHERE user_id = $1", user.id)


async def any_exist(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users)"))


async def get_by_handle(conn: asyncpg.Connection, handle: str) -> User | None:
    """The user whose username or email is exactly `handle`."""
    row = await conn.fetchrow(
        """
        SELECT id, username, email, created_at FROM users
        WHERE username = $1 OR email = $1 LIMIT 1
        """,
        handle,
    )
    return User(**row) if row else None


async def get_by_username(conn: asyncpg.Connection, username: str) -> User | None:
    row = await conn.fetchrow(
        "SELECT id, username, email, created_at FROM users WHERE username = $1", username
    )
    return User(**row) if row else None


async def by_ids(conn: asyncpg.Connection, ids: set[int]) -> dict[int, User]:
    """Users by id, for embedding in listings."""
    rows = await conn.fetch(
        "SELECT id, username, email, created_at FROM users WHERE id = ANY($1)", list(ids)
    )
    return {row["id"]: User(**row) for row in rows}


async def password_hash_of(conn: asyncpg.Connection, handle: str) -> tuple[User, str] | None:
    """The user for `handle` with their stored password hash, for a credentials check."""
    row = await conn.fetchrow(
        """
        SELECT id, username, email, created_at, password_hash FROM users
        WHERE username = $1 OR email = $1 LIMIT 1
        """,
        handle,
    )
    if row is None:
        return None
    data = dict(row)
    stored = data.pop("password_hash")
    return User(**data), stored
