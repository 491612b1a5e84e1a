"""Idempotent creation (docs/api.md §22): a retried `POST /builds`, `POST /objects` or
`POST /images` with the same Idempotency-Key replays the first 201."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from marid.api.keys import POOL
from marid.api.uploads import Upload
from marid.users import User
from marid.validation import RequestError, ValidationError

KEY = re.compile(r"[\x21-\x7e]{1,255}")
HEADER = "Idempotency-Key"
# A key whose first request never finished (its server died) is free again after this.
ABANDONED = "5 minutes"


def header(request: web.Request) -> str | None:
    """The request's Idempotency-Key, or None; a malformed one is a 400 before the body is
    read."""
    key = request.headers.get(HEADER)
    if key is not None:
        check(key)
    return key


def check(key: str) -> None:
    if not KEY.fullmatch(key):
        raise ValidationError(
            {"idempotency_key": ["Idempotency-Key must be 1 to 255 visible ASCII characters"]}
        )


def fingerprint(endpoint: str, **parts: str | None) -> str:
    """What identifies a request that is not compared by its raw body (docs/api.md §22): the
    SHA-256 of `endpoint` and `parts` as canonical JSON, e.g. the form fields and the file's
    own SHA-256 for an upload, whose multipart framing differs from one try to the next."""
    text = json.dumps({"endpoint": endpoint, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


async def upload_once(
    request: web.Request,
    user: User,
    key: str | None,
    endpoint: str,
    names: tuple[str, ...],
    upload: Upload,
    handler: Callable[[], Awaitable[web.Response]],
) -> web.Response:
    """`handler` for a received upload to `endpoint`; with an Idempotency-Key, once (`once`),
    the request known by its form fields `names` and its file's SHA-256."""
    if key is None:
        return await handler()
    fields = {name: upload.fields.get(name) for name in names}
    digest = fingerprint(endpoint, **fields, file_sha256=upload.content.sha256)
    return await once(request, user, key, handler, digest)


async def once(
    request: web.Request,
    user: User,
    key: str,
    handler: Callable[[], Awaitable[web.Response]],
    digest: str | None = None,
) -> web.Response:
    """Run `handler` once per (user, key, request) within 24 h; only 201 outcomes are kept.

    `digest` identifies the request (`fingerprint`); None means the SHA-256 of the body. The
    handler may `keep` its 201 in its own transaction; otherwise it is kept after it returns.
    """
    check(key)
    if digest is None:
        digest = hashlib.sha256(await request.read()).hexdigest()
    pool: asyncpg.Pool = request.config_dict[POOL]
    async with pool.acquire() as conn:
        existing = await _claim(conn, user, key, digest)
    if existing is not None:
        return _replay(existing, digest)
    try:
        response = await handler()
    except BaseException:
        await _release(pool, user, key)
        raise
    if response.status == 201 and isinstance(response.body, bytes):
        async with pool.acquire() as conn:
            await keep(conn, user, key, response)
    else:
        await _release(pool, user, key)
    return response


async def keep(conn: asyncpg.Connection, user: User, key: str, response: web.Response) -> None:
    """Record `response` (a 201) as the outcome of `key`. Called inside the transaction that
    creates the resource, the outcome commits with it: a server that dies after the commit
    still replays it."""
    await conn.execute(
        """
        UPDATE idempotency_keys SET status = $3, body = $4
        WHERE user_id = $1 AND key = $2 AND status IS NULL
        """,
        user.id,
        key,
        response.status,
        response.body,
    )


async def _release(pool: asyncpg.Pool, user: User, key: str) -> None:
    """Free the key of a request that kept no outcome (a kept one is never released)."""
    await pool.execute(
        "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND status IS NULL",
        user.id,
        key,
    )


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
