"""OAuth applications (docs/api.md §23): registration, lookup by client id, deletion.

Client secrets are shown once and stored as SHA-256 digests, like token values.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from marid.times import rfc3339
from marid.users import User
from marid.validation import Body, ValidationError

# Native apps listen on a loopback port (RFC 8252 §7.3); custom schemes are refused (issue 11).
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
REDIRECT_URI_MESSAGE = (
    "Redirect URI must be an https URL, or an http URL on a loopback host "
    "(127.0.0.1, [::1] or localhost), without a fragment"
)


@dataclass(frozen=True)
class App:
    id: int
    user_id: int
    client_id: str
    name: str
    description: str
    homepage_uri: str
    redirect_uri: str
    # Kept out of repr: authlib logs clients with %r.
    secret_digest: str = field(repr=False)
    created_at: datetime

    def check_secret(self, secret: str) -> bool:
        return hmac.compare_digest(digest(secret), self.secret_digest)


@dataclass(frozen=True)
class AppForm:
    name: str
    description: str
    homepage_uri: str
    redirect_uri: str

    @classmethod
    def parse(cls, body: Body) -> AppForm:
        """The EXT i body rules; raises ValidationError with every field's messages."""
        name = body.required_string("name", "Name")
        description = body.string("description", "Description") or ""
        if len(description) > 255:
            body.errors.add(
                "description", "Description cannot be longer than 255 characters in length"
            )
        homepage = body.required_string("homepage_uri", "Homepage URI")
        if homepage is not None and not _is_web_url(homepage):
            body.errors.add("homepage_uri", "Homepage URI must be an absolute http or https URL")
        redirect = body.required_string("redirect_uri", "Redirect URI")
        if redirect is not None and not is_redirect_uri(redirect):
            body.errors.add("redirect_uri", REDIRECT_URI_MESSAGE)
        body.errors.raise_if_any()
        assert name is not None and homepage is not None and redirect is not None
        return cls(name, description, homepage, redirect)


def _parts(value: str) -> Any:
    if any(c.isspace() or ord(c) < 32 for c in value):
        return None
    try:
        return urlsplit(value)
    except ValueError:
        return None


def _is_web_url(value: str) -> bool:
    parts = _parts(value)
    return parts is not None and parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def is_redirect_uri(value: str) -> bool:
    """Whether codes may be sent to `value`: https with a host, or http to a loopback host.
    javascript:, data:, file: and custom schemes are refused (issue 11 row 11)."""
    parts = _parts(value)
    if parts is None or "#" in value or not parts.hostname:
        return False
    try:
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        return False
    scheme = parts.scheme.lower()
    return scheme == "https" or (scheme == "http" and parts.hostname in LOOPBACK_HOSTS)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def to_json(app: App, api_url: str) -> dict[str, Any]:
    """The App entity of docs/api.md §23 (without the secret)."""
    return {
        "client_id": app.client_id,
        "name": app.name,
        "description": app.description,
        "homepage_uri": app.homepage_uri,
        "redirect_uri": app.redirect_uri,
        "created_at": rfc3339(app.created_at),
        "url": f"{api_url}/apps/{app.client_id}",
    }


async def create(conn: asyncpg.Connection, user: User, form: AppForm) -> tuple[App, str]:
    """Register an app for `user`; returns it with its client secret (the only time it is
    known)."""
    secret = secrets.token_hex(32)
    try:
        row = await conn.fetchrow(
            """
            INSERT INTO apps (user_id, client_id, name, description, homepage_uri,
                              redirect_uri, secret_digest)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            RETURNING id, user_id, client_id, name, description, homepage_uri, redirect_uri,
                      secret_digest, created_at
            """,
            user.id,
            secrets.token_hex(16),
            form.name,
            form.description,
            form.homepage_uri,
            form.redirect_uri,
            digest(secret),
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "apps_user_id_name_key":
            raise ValidationError({"name": ["Name already exists"]}) from exc
        raise
    return App(**row), secret


async def list_for(conn: asyncpg.Connection, user: User) -> list[App]:
    rows = await conn.fetch(
        """
        SELECT id, user_id, client_id, name, description, homepage_uri, redirect_uri,
               secret_digest, created_at
        FROM apps WHERE user_id = $1 ORDER BY created_at, id
        """,
        user.id,
    )
    return [App(**row) for row in rows]


async def get(conn: asyncpg.Connection, client_id: str) -> App | None:
    """The app with `client_id`, whoever owns it (the OAuth endpoints' lookup)."""
    row = await conn.fetchrow(
        """
        SELECT id, user_id, client_id, name, description, homepage_uri, redirect_uri,
               secret_digest, created_at
        FROM apps WHERE client_id = $1
        """,
        client_id,
    )
    return App(**row) if row else None


async def delete(conn: asyncpg.Connection, user: User, client_id: str) -> bool:
    """Delete one of `user`'s apps with its codes and every token that came through it: its
    tokens (`app_id`) and personal tokens minted with them (`via_app_id`), both by ON DELETE
    CASCADE. False when they have no such app."""
    result = await conn.execute(
        "DELETE FROM apps WHERE client_id = $1 AND user_id = $2", client_id, user.id
    )
    return bool(result == "DELETE 1")
