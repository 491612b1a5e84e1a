"""Idempotent build submission (docs/api.md §22): a retried POST replays the first 201."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from marid.api.keys import POOL
from marid.users import User
from marid.validation import RequestError, ValidationError

KEY = re.compile(r"[\x21-\x7e]{1,255}")
# A key whose first request never finished (its server died) is free again after this.
ABANDONED = "5 minutes"


async def once(
    request: web.Request,
    user: User,
    key: str,
    handler: Callable[[], Awaitable[web.Response]],
) -> web.Response:
    """Run `handler` once per (user, key, body) within 24 h; only 201 outcomes are kept."""
    if not KEY.fullmatch(key):
        raise ValidationError(
            {"idempotency_key": ["Idempotency-Key must be 1 to 255 visible ASCII characters"]}
        )
    digest = hashlib.sha256(await request.read()).hexdigest()
    pool: asyncpg.Pool = request.config_dict[POOL]
    async with pool.acquire() as conn:
        existing = await _claim(conn, user, key, digest)
    if existing is not None:
        return _replay(existing, digest)
    try:
        response = await handler()
    except BaseException:
        await pool.execute(
            "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2", user.id, key
        )
        raise
    if response.status == 201 and isinstance(response.body, bytes):
        await pool.execute(
            "UPDATE idempotency_keys SET status = $3, body = $4 WHERE user_id = $1 AND key = $2",
            user.id,
            key,
            response.status,
            response.body,
        )
    else:
        await pool.execute(
            "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2", user.id, key
        )
    return response


async def _claim(
    conn: asyncpg.Connection, user: User, key: str, digest: str
) -> asyncpg.Record | None:
    """Claim the key for this request (None), or return the row of the request that holds it."""
    claimed = await conn.fetchval(
        f"""
        INSERT INTO idempotency_keys (user_id, key, request_sha256) VALUES ($1, $2, $3)
        ON CONFLICT (user_id, key) DO UPDATE
            SET request_sha256 = excluded.request_sha256, status = NULL, body = NULL,
                created_at = now()
            WHERE idempotency_keys.created_at < now() - interval '24 hours'
               OR (idempotency_keys.status IS NULL
                   AND idempotency_keys.created_at < now() - interval '{ABANDONED}')
        RETURNING true
        """,  # noqa: S608 - a constant, not input
        user.id,
        key,
        digest,
    )
    if claimed:
        return None
    row = await conn.fetchrow(
        "SELECT request_sha256, status, body FROM idempotency_keys WHERE user_id = $1 AND key = $2",
        user.id,
        key,
    )
    assert row is not None
    return row


def _replay(row: asyncpg.Record, digest: str) -> web.Response:
    if row["status"] is None:
        raise RequestError("A request with this Idempotency-Key is in progress", 409)
    if row["request_sha256"] != digest:
        raise RequestError("Idempotency-Key was used with a different request", 422)
    return web.Response(
        body=row["body"],
        status=row["status"],
        content_type="application/json",
        charset="utf-8",
        headers={"Idempotent-Replayed": "true"},
    )
