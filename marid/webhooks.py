"""Webhooks (docs/api.md §10): the entity, its validation, queuing events and the delivery records.

An event is queued with `emit()` inside the transaction of the change that caused it, as one
webhook_deliveries row per subscribed webhook; the scheduler's deliverer (scheduler/hooks.py)
claims due rows, sends them and records each attempt here. This module does no HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from marid import builds, channels, namespaces, outbound
from marid.crypto import Cipher
from marid.namespaces import Namespace
from marid.times import rfc3339
from marid.users import User
from marid.validation import Body, Errors

# In the order of docs/api.md §10.6, which is also the order `events` is returned in.
EVENTS = (
    "build.submitted",
    "build.started",
    "build.finished",
    "build.tagged",
    "build.pinned",
    "build.unpinned",
    "invite.sent",
    "invite.accepted",
    "invite.rejected",
    "namespaces",
    "cron",
    "images",
    "objects",
    "variables",
    "ssh_keys",
)
# The payload key of the entity in `{"action": ..., <key>: entity}` events.
SUBJECTS = {
    "namespaces": "namespace",
    "cron": "cron",
    "images": "image",
    "objects": "object",
    "variables": "variable",
    "ssh_keys": "key",
}
KEEP_RECORDS = timedelta(days=30)  # §10.7

Payload = dict[str, Any] | Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Webhook:
    id: int
    user_id: int
    author_id: int
    namespace_id: int
    payload_url: str
    secret_sealed: bytes | None = field(repr=False)
    ssl: bool
    active: bool
    events: list[str]
    created_at: datetime


@dataclass(frozen=True)
class LastResponse:
    code: int | None
    duration: int  # nanoseconds
    error: str | None
    created_at: datetime


def _from_row(row: asyncpg.Record) -> Webhook:
    """A `webhooks` row (its columns are Webhook's fields)."""
    data = dict(row)
    data["events"] = list(data["events"])
    return Webhook(**data)


def associated_data(webhook_id: int) -> bytes:
    """What a webhook secret's blob is bound to: the webhook, whose id never changes (a
    delivery keeps the id beside its copy of the blob)."""
    return f"webhook:{webhook_id}".encode()


def signature(secret: str, body: bytes) -> str:
    """The `X-Djinn-CI-Signature` header value (§10.7): the body alone, kept as Djinn signs."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def marid_signature(secret: str, timestamp: int, delivery_id: str, body: bytes) -> str:
    """The `X-Marid-Signature` header value (§10.7): HMAC-SHA256 of
    `<timestamp>.<delivery id>.<body>`, so a receiver can refuse a replayed request."""
    signed = f"{timestamp}.{delivery_id}.".encode() + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


@dataclass
class WebhookForm:
    """A POST or PATCH N/-/webhooks body after its checks (§10.4, §10.5); None = not given."""

    payload_url: str | None
    secret: str | None
    remove_secret: bool
    ssl: bool | None
    active: bool | None
    events: list[str] | None  # [] is not kept: it means every event
    errors: Errors = field(repr=False)

    @classmethod
    def parse(cls, body: Body, policy: outbound.Policy, current: Webhook | None) -> WebhookForm:
        """`current` is the webhook a PATCH changes (None for POST): its URL and `ssl` flag
        take part in the checks when the body leaves them out. A host that is a literal address
        `policy` refuses is refused here; names are checked at each delivery."""
        if current is None:
            url = body.required_string("payload_url", "Payload URL")
        else:
            url = body.string("payload_url", "Payload URL") or None
        secret = body.string("secret", "Secret")
        remove = body.boolean("remove_secret", "Remove secret") if current else None
        ssl = body.boolean("ssl", "SSL")
        active = body.boolean("active", "Active")
        events = body.strings("events", "Events")
        for name in events or ():
            if name not in EVENTS:
                body.errors.add("events", f"Events unknown event {name}")
        if events is not None:
            chosen = set(events)
            events = [name for name in EVENTS if name in chosen] or list(EVENTS)
        if url is not None or (ssl and current is not None):
            effective_ssl = ssl if ssl is not None else bool(current and current.ssl)
            _check_url(url or (current.payload_url if current else ""), effective_ssl,
                       policy, body.errors)  # fmt: skip
        return cls(url, secret or None, bool(remove), ssl, active, events, body.errors)

    def changes_secret(self) -> bool:
        return self.secret is not None or self.remove_secret


def _check_url(url: str, ssl: bool, policy: outbound.Policy, errors: Errors) -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        errors.add("payload_url", "Payload URL missing http or https scheme")
        return
    if parts.scheme not in ("http", "https"):
        errors.add("payload_url", "Payload URL missing http or https scheme")
    elif not host:
        errors.add("payload_url", "Payload URL missing host")
    elif refused := _refusal(policy, host):
        errors.add("payload_url", refused)
    elif ssl and parts.scheme != "https":
        errors.add("payload_url", "Payload URL cannot use SSL for plain http URL")


def _refusal(policy: outbound.Policy, host: str) -> str | None:
    """The message for a host the policy refuses before any lookup: Djinn's for an address of
    this machine, the policy's reason for the others."""
    try:
        policy.check_host(host)
    except outbound.Refused as exc:
        if exc.reason in ("loopback", "unspecified"):
            return "Payload URL cannot be localhost"
        return f"Payload URL {exc}"
    return None


async def _url_taken(conn: asyncpg.Connection, ns_id: int, url: str, exclude: int) -> bool:
    return await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM webhooks WHERE namespace_id = $1 AND payload_url = $2"
        " AND id <> $3)",
        ns_id,
        url,
        exclude,
    )


async def create(
    conn: asyncpg.Connection, cipher: Cipher, author: User, ns: Namespace, form: WebhookForm
) -> Webhook:
    """Insert a webhook of `ns`; raises ValidationError. The caller owns the transaction."""
    url = form.payload_url
    checkable = url is not None and not form.errors.has("payload_url")
    if checkable and await _url_taken(conn, ns.id, url or "", 0):
        form.errors.add("payload_url", "Payload URL already exists")
    form.errors.raise_if_any()
    hook_id = await conn.fetchval("SELECT nextval('webhooks_id_seq')")
    sealed = _seal(cipher, hook_id, form.secret)
    # A concurrent create of the same URL waits on the unique index, then inserts nothing:
    # a field error rather than a 500.
    row = await conn.fetchrow(
        """
        INSERT INTO webhooks (id, user_id, author_id, namespace_id, payload_url, secret_sealed,
                              ssl, active, events)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        ON CONFLICT (namespace_id, payload_url) DO NOTHING
        RETURNING *
        """,
        hook_id,
        ns.user_id,
        author.id,
        ns.id,
        form.payload_url,
        sealed,
        bool(form.ssl),
        form.active is not False,
        form.events or list(EVENTS),
    )
    if row is None:
        form.errors.add("payload_url", "Payload URL already exists")
        form.errors.raise_if_any()
    return _from_row(row)


def _seal(cipher: Cipher, hook_id: int, secret: str | None) -> bytes | None:
    if secret is None:
        return None
    return cipher.encrypt_text(secret, associated_data=associated_data(hook_id))


def secret_of(cipher: Cipher, hook_id: int, sealed: bytes | None) -> str | None:
    """The plaintext secret (for signing only); raises DecryptionError."""
    if sealed is None:
        return None
    return cipher.decrypt_text(sealed, associated_data=associated_data(hook_id))


async def update(
    conn: asyncpg.Connection, cipher: Cipher, hook: Webhook, form: WebhookForm
) -> Webhook:
    """Apply a PATCH (§10.5); raises ValidationError. The caller owns the transaction."""
    url = form.payload_url
    taken = url is not None and not form.errors.has("payload_url")
    if taken and await _url_taken(conn, hook.namespace_id, url or "", hook.id):
        form.errors.add("payload_url", "Payload URL already exists")
    form.errors.raise_if_any()
    sealed = hook.secret_sealed
    if form.secret is not None:
        sealed = _seal(cipher, hook.id, form.secret)
    elif form.remove_secret:
        sealed = None
    try:
        row = await _update(conn, hook, url, sealed, form)
    except asyncpg.UniqueViolationError:  # another request took the URL meanwhile
        form.errors.add("payload_url", "Payload URL already exists")
        form.errors.raise_if_any()
        raise
    return _from_row(row)


async def _update(
    conn: asyncpg.Connection,
    hook: Webhook,
    url: str | None,
    sealed: bytes | None,
    form: WebhookForm,
) -> asyncpg.Record:
    return await conn.fetchrow(
        """
        UPDATE webhooks
        SET payload_url = coalesce($2, payload_url), secret_sealed = $3,
            ssl = coalesce($4, ssl), active = coalesce($5, active),
            events = coalesce($6, events)
        WHERE id = $1
        RETURNING *
        """,
        hook.id,
        url,
        sealed,
        form.ssl,
        form.active,
        form.events,
    )


async def get(conn: asyncpg.Connection, hook_id: int) -> Webhook | None:
    row = await conn.fetchrow("SELECT * FROM webhooks WHERE id = $1", hook_id)
    return _from_row(row) if row else None


async def in_namespace(conn: asyncpg.Connection, ns_id: int) -> list[Webhook]:
    rows = await conn.fetch("SELECT * FROM webhooks WHERE namespace_id = $1 ORDER BY id", ns_id)
    return [_from_row(row) for row in rows]


async def delete(conn: asyncpg.Connection, hook: Webhook) -> None:
    """Remove the webhook with its deliveries, queued or done, and their attempts (§10.5)."""
    await conn.execute("DELETE FROM webhook_deliveries WHERE webhook_id = $1", hook.id)
    await conn.execute("DELETE FROM webhooks WHERE id = $1", hook.id)


async def last_responses(conn: asyncpg.Connection, ids: list[int]) -> dict[int, LastResponse]:
    rows = await conn.fetch(
        """
        SELECT DISTINCT ON (webhook_id) webhook_id, code, duration, error, created_at
        FROM webhook_attempts WHERE webhook_id = ANY($1::bigint[])
        ORDER BY webhook_id, id DESC
        """,
        ids,
    )
    return {
        row["webhook_id"]: LastResponse(
            row["code"], row["duration"], row["error"], row["created_at"]
        )
        for row in rows
    }


def to_json(
    hook: Webhook, ns: Namespace, last: LastResponse | None, api_url: str
) -> dict[str, Any]:
    """The Webhook entity of docs/api.md §10.1; the secret is never part of it."""
    return {
        "id": hook.id,
        "user_id": hook.user_id,
        "author_id": hook.author_id,
        "namespace_id": hook.namespace_id,
        "payload_url": hook.payload_url,
        "ssl": hook.ssl,
        "active": hook.active,
        "events": hook.events,
        "url": f"{ns.url(api_url)}/-/webhooks/{hook.id}",
        "namespace": namespaces.to_json(ns, api_url),
        "last_response": None
        if last is None
        else {
            "code": last.code,
            "duration": last.duration,
            "error": last.error,
            "created_at": rfc3339(last.created_at),
        },
    }


async def emit(
    conn: asyncpg.Connection, namespace_id: int | None, event: str, payload: Payload
) -> int:
    """Queue `event` for the active webhooks of exactly `namespace_id` subscribed to it (§10.6);
    returns how many deliveries were queued. `payload` may be a function, called only when
    some webhook wants the event. Runs in the caller's transaction: a rolled-back change sends
    nothing, and the NOTIFY that wakes the deliverer is sent on commit."""
    assert event in EVENTS, event
    if namespace_id is None:
        return 0
    hooks = await conn.fetch(
        """
        SELECT id, payload_url, secret_sealed FROM webhooks
        WHERE namespace_id = $1 AND active AND $2 = ANY(events)
        ORDER BY id
        """,
        namespace_id,
        event,
    )
    if not hooks:
        return 0
    document = payload if isinstance(payload, dict) else await payload()
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    await conn.execute(
        """
        INSERT INTO webhook_deliveries (webhook_id, payload_url, secret_sealed, event, body)
        SELECT hook.id, hook.url, hook.secret, $4, $5
        FROM unnest($1::bigint[], $2::text[], $3::bytea[]) AS hook (id, url, secret)
        """,
        [row["id"] for row in hooks],
        [row["payload_url"] for row in hooks],
        [row["secret_sealed"] for row in hooks],
        event,
        body,
    )
    await conn.execute("SELECT pg_notify($1, '')", channels.HOOKS)
    return len(hooks)


async def listening(conn: asyncpg.Connection, namespace_ids: set[int], event: str) -> set[int]:
    """Those of `namespace_ids` with an active webhook subscribed to `event`: one query that
    spares a batch (the scheduler's) a look per build."""
    rows = await conn.fetch(
        """
        SELECT DISTINCT namespace_id FROM webhooks
        WHERE namespace_id = ANY($1::bigint[]) AND active AND $2 = ANY(events)
        """,
        list(namespace_ids),
        event,
    )
    return {row["namespace_id"] for row in rows}


async def emit_build(conn: asyncpg.Connection, build_id: int, event: str, api_url: str) -> int:
    """Queue a build event whose payload is the Build as it is now (§10.6)."""
    ns_id = await conn.fetchval("SELECT namespace_id FROM builds WHERE id = $1", build_id)

    async def payload() -> dict[str, Any]:
        build = await builds.get(conn, build_id)
        assert build is not None
        [rendered] = await builds.many_to_json(conn, [build], api_url)
        return rendered

    return await emit(conn, ns_id, event, payload)


# Delivery records (§10.7), used by scheduler/hooks.py.


@dataclass(frozen=True)
class Delivery:
    id: int
    webhook_id: int
    payload_url: str
    secret_sealed: bytes | None = field(repr=False)
    event: str
    body: bytes
    attempts: int  # including the one just claimed


@dataclass(frozen=True)
class Outcome:
    code: int | None
    duration: int  # nanoseconds
    error: str | None
    final: bool = False  # refused before sending (another attempt would fare no better)

    @property
    def delivered(self) -> bool:
        """Any response but a server error (docs/api.md §10.7: a 5xx or no answer is
        retried, and a 5xx is what a receiver that is down behind a proxy answers)."""
        return self.code is not None and self.code < 500

    @property
    def retry(self) -> bool:
        """Worth another attempt, if any are left."""
        return not self.delivered and not self.final


async def claim_due(
    conn: asyncpg.Connection, now: datetime, limit: int, lease: timedelta
) -> list[Delivery]:
    """Claim up to `limit` due deliveries, counting the attempt now. A claim is held until
    `now + lease`: a deliverer that dies mid-request leaves the delivery to be retried then."""
    rows = await conn.fetch(
        """
        UPDATE webhook_deliveries AS d
        SET attempts = d.attempts + 1, next_attempt_at = $2
        FROM (
            SELECT id FROM webhook_deliveries
            WHERE state = 'pending' AND next_attempt_at <= $1
            ORDER BY next_attempt_at, id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        ) AS due
        WHERE d.id = due.id
        RETURNING d.id, d.webhook_id, d.payload_url, d.secret_sealed, d.event, d.body, d.attempts
        """,
        now,
        now + lease,
        limit,
    )
    return sorted((Delivery(**dict(row)) for row in rows), key=lambda d: d.id)


async def record(
    conn: asyncpg.Connection,
    delivery: Delivery,
    outcome: Outcome,
    at: datetime,
    retry_at: datetime | None,
) -> None:
    """Log one attempt and settle the delivery: delivered, failed for good (`retry_at` None),
    or pending again until `retry_at`. Nothing is logged for a delivery deleted meanwhile
    (its webhook was)."""
    if outcome.delivered:
        state, when = "delivered", at
    elif retry_at is None:
        state, when = "failed", at
    else:
        state, when = "pending", retry_at
    await conn.execute(
        """
        WITH settled AS (
            UPDATE webhook_deliveries SET state = $2, next_attempt_at = $3 WHERE id = $1
            RETURNING id, webhook_id, event, attempts
        )
        INSERT INTO webhook_attempts (delivery_id, webhook_id, event, attempt, code,
                                      duration, error, created_at)
        SELECT id, webhook_id, event, attempts, $4, $5, $6, $7 FROM settled
        """,
        delivery.id,
        state,
        when,
        outcome.code,
        outcome.duration,
        outcome.error,
        at,
    )


@dataclass(frozen=True)
class Attempt:
    id: int
    delivery_id: int
    event: str
    attempt: int
    code: int | None
    duration: int
    error: str | None
    created_at: datetime
    state: str  # the delivery's state now: pending (a retry is due), delivered or failed


async def count_attempts(conn: asyncpg.Connection, hook: Webhook) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM webhook_attempts WHERE webhook_id = $1", hook.id
    )


async def attempts(
    conn: asyncpg.Connection, hook: Webhook, offset: int, limit: int
) -> list[Attempt]:
    """The webhook's delivery log, newest first."""
    rows = await conn.fetch(
        """
        SELECT a.id, a.delivery_id, a.event, a.attempt, a.code, a.duration, a.error,
               a.created_at, d.state
        FROM webhook_attempts AS a JOIN webhook_deliveries AS d ON d.id = a.delivery_id
        WHERE a.webhook_id = $1
        ORDER BY a.id DESC OFFSET $2 LIMIT $3
        """,
        hook.id,
        offset,
        limit,
    )
    return [Attempt(**dict(row)) for row in rows]


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    return {
        "id": attempt.id,
        "delivery_id": attempt.delivery_id,
        "event": attempt.event,
        "attempt": attempt.attempt,
        "code": attempt.code,
        "duration": attempt.duration,
        "error": attempt.error,
        "created_at": rfc3339(attempt.created_at),
        "state": attempt.state,
    }


async def next_due(conn: asyncpg.Connection) -> datetime | None:
    return await conn.fetchval(
        "SELECT min(next_attempt_at) FROM webhook_deliveries WHERE state = 'pending'"
    )


async def purge(conn: asyncpg.Connection, now: datetime) -> None:
    """Delete attempts and settled deliveries older than 30 days (§10.7)."""
    cutoff = now - KEEP_RECORDS
    async with conn.transaction():
        # What /metrics counts of the attempts deleted here (marid/metrics.py) is kept.
        await conn.execute(
            """
            WITH gone AS (DELETE FROM webhook_attempts WHERE created_at < $1 RETURNING code)
            INSERT INTO metric_counters (name, label, value)
            SELECT 'webhook_deliveries', CASE WHEN code IS NULL THEN 'error' ELSE 'response' END,
                   count(*)
            FROM gone GROUP BY 2
            ON CONFLICT (name, label) DO UPDATE SET value = metric_counters.value + excluded.value
            """,
            cutoff,
        )
        await conn.execute(
            "DELETE FROM webhook_deliveries WHERE state <> 'pending' AND created_at < $1", cutoff
        )
