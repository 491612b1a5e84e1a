"""Web sessions (migrations/0019_web_sessions.sql, docs/web.md §2): the cookie value is shown
once to the browser and stored as a SHA-256 digest; each session has a CSRF secret."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from marid.users import User

IDLE = timedelta(days=7)  # a session unused this long ends
LIFETIME = timedelta(days=30)  # and none lasts longer than this
TOUCH_EVERY = timedelta(minutes=5)  # last_seen_at is written at most this often
MAX_USER_AGENT = 200


@dataclass(frozen=True)
class Session:
    id: int
    user: User
    csrf: str


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def csrf_matches(session: Session, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(session.csrf.encode(), sent.encode())


async def create(conn: asyncpg.Connection, user: User, user_agent: str = "") -> tuple[str, Session]:
    """A new session of `user`: the cookie value (shown only now) and the session."""
    value, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    session_id = await conn.fetchval(
        """
        INSERT INTO web_sessions (digest, user_id, csrf, expires_at, user_agent)
        VALUES ($1, $2, $3, now() + $4::interval, $5)
        RETURNING id
        """,
        digest(value),
        user.id,
        csrf,
        IDLE,
        user_agent[:MAX_USER_AGENT],
    )
    return value, Session(session_id, user, csrf)


async def get(conn: asyncpg.Connection, value: str) -> Session | None:
    """The live session of cookie `value`, its idle limit moved on; None if there is none."""
    row = await conn.fetchrow(
        """
        SELECT s.id, s.csrf, s.last_seen_at < now() - $2::interval AS stale,
               u.id AS user_id, u.username, u.email, u.created_at
        FROM web_sessions s JOIN users u ON u.id = s.user_id
        WHERE s.digest = $1 AND s.expires_at > now()
        """,
        digest(value),
        TOUCH_EVERY,
    )
    if row is None:
        return None
    if row["stale"]:
        await conn.execute(
            """
            UPDATE web_sessions SET last_seen_at = now(),
                expires_at = least(now() + $2::interval, created_at + $3::interval)
            WHERE id = $1
            """,
            row["id"],
            IDLE,
            LIFETIME,
        )
    user = User(row["user_id"], row["username"], row["email"], row["created_at"])
    return Session(row["id"], user, row["csrf"])


async def end(conn: asyncpg.Connection, session_id: int) -> None:
    await conn.execute("DELETE FROM web_sessions WHERE id = $1", session_id)


async def end_all(conn: asyncpg.Connection, user_id: int) -> None:
    """Sign the user out everywhere (their password was set again)."""
    await conn.execute("DELETE FROM web_sessions WHERE user_id = $1", user_id)


async def forget_expired(conn: asyncpg.Connection) -> int:
    """Delete sessions past their limits; how many."""
    done = await conn.execute("DELETE FROM web_sessions WHERE expires_at <= now()")
    return int(done.split()[-1])
