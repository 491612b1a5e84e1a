"""Authentication and scope checks (docs/api.md §1.5, §1.6, §2; docs/api.md §18.2).

Djinn-compatible endpoints answer 404 for every authentication or scope failure; only the
marid endpoints that accept HTTP Basic (`/tokens`, `/apps`) answer 401.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from aiohttp import web

from marid import scopes, sessions, tokens, users
from marid.api.keys import POOL, RATE_LIMITER, SESSION_COOKIE
from marid.namespaces import Rights
from marid.sessions import Session
from marid.users import User
from marid.validation import NotFound, RequestError


@dataclass(frozen=True)
class Caller:
    """Who is calling: `user` is None for anonymous callers; `scope` None means full access."""

    user: User | None
    scope: scopes.Scope | None = None
    token_id: int | None = None

    def can(self, resource: str, permission: str) -> bool:
        return self.user is not None and (
            self.scope is None or self.scope.has(resource, permission)
        )

    def require(self, *needed: str, waived: bool = False) -> None:
        """Raise NotFound unless every `resource:permission` is held (or `waived`, §2.4)."""
        if waived:
            return
        for item in needed:
            resource, _, permission = item.partition(":")
            if not self.can(resource, permission):
                raise NotFound()

    def check_read(self, rights: Rights, *needed: str) -> None:
        """An `optional` read (§1.6 order): NotFound unless the caller may see the target
        and holds `needed` (waived for public namespaces, §2.4)."""
        if not rights.see:
            raise NotFound()
        self.require(*needed, waived=rights.public)


ANONYMOUS = Caller(None)
CALLER = web.RequestKey("caller", Caller)
BASIC = web.RequestKey("basic_caller", Caller)  # ANONYMOUS: no valid Basic credentials


def _credentials(request: web.Request, scheme: str) -> str | None:
    header = request.headers.get("Authorization", "")
    given, _, value = header.partition(" ")
    return value.strip() if given.lower() == scheme else None


async def bearer(request: web.Request) -> Caller:
    """The caller named by the request's bearer token; anonymous when there is none or it is
    unknown. Looked up once per request."""
    if CALLER in request:
        return request[CALLER]
    caller = ANONYMOUS
    value = _credentials(request, "bearer")
    if value:
        async with request.config_dict[POOL].acquire() as conn:
            found = await tokens.authenticate(conn, value)
        if found is not None:
            caller = Caller(found.user, found.scope, found.token_id)
    request[CALLER] = caller
    return caller


TokenHandler = Callable[[web.Request, User], Awaitable[web.StreamResponse]]
OptionalHandler = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def requires(*needed: str) -> Callable[[TokenHandler], Handler]:
    """Auth mode `token`: a valid bearer token holding every scope in `needed`, else 404.

    The handler receives the token's user.
    """

    def decorate(handler: TokenHandler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            caller = await bearer(request)
            if caller.user is None:
                raise NotFound()
            caller.require(*needed)
            return await handler(request, caller.user)

        wrapper.__dict__["auth"] = ("token", needed)
        return wrapper

    return decorate


def optional(handler: OptionalHandler) -> Handler:
    """Auth mode `optional`: the handler gets the Caller (possibly anonymous) and checks
    scopes itself after loading the resource, since public namespaces waive them (§2.4)."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        return await handler(request, await bearer(request))

    wrapper.__dict__["auth"] = ("optional", ())
    return wrapper


UNAUTHORIZED = {"WWW-Authenticate": 'Basic realm="marid"'}


def basic_or_bearer(needed: str) -> Callable[[OptionalHandler], Handler]:
    """EXT b.2: HTTP Basic (full access to the user's own tokens/apps) or a bearer token with
    `needed`; anything else is 401."""

    def decorate(handler: OptionalHandler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            caller = await basic(request) or await bearer(request)
            if not caller.can(*needed.split(":")):
                raise RequestError("Unauthorized", 401, UNAUTHORIZED)
            return await handler(request, caller)

        wrapper.__dict__["auth"] = ("basic", (needed,))
        return wrapper

    return decorate


async def basic(request: web.Request) -> Caller | None:
    """The user of valid HTTP Basic credentials (full access), else None. Checked once per
    request: the password hash is deliberately slow."""
    if BASIC not in request:
        request[BASIC] = await _basic(request) or ANONYMOUS
    found = request[BASIC]
    return found if found.user is not None else None


async def _basic(request: web.Request) -> Caller | None:
    encoded = _credentials(request, "basic")
    if not encoded:
        return None
    try:
        handle, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user = await login(request, handle, password)
    return Caller(user, None) if user is not None else None


async def login(
    request: web.Request, handle: str, password: str, conn: asyncpg.Connection | None = None
) -> User | None:
    """The user whose `handle` (name or email) and `password` these are, else None.

    Every password check goes through here (docs/api.md §1.5, issue 11 rows 6 and 10): when
    the user's or the client address's failed-login budget is spent, 429 before any hashing,
    the same answer whether or not the password is right; an unknown handle costs one scrypt
    like a known one. `conn` looks the user up; without it one is taken from the pool.
    """
    if conn is None:
        async with request.config_dict[POOL].acquire() as conn:
            found = await users.password_hash_of(conn, handle) if handle else None
    else:
        found = await users.password_hash_of(conn, handle) if handle else None
    limiter = request.config_dict.get(RATE_LIMITER)
    keys: tuple[str, ...] = ()
    if limiter is not None:
        who = f"login-user:{found[0].id}" if found else f"login-handle:{handle.lower()}"
        peer = limiter.client(request.remote or "", request.headers.get("X-Forwarded-For", ""))
        keys = (who, f"login-ip:{peer}")
        now = time.time()
        reset = limiter.begin_login(keys, now)
        if reset is not None:
            retry = {"Retry-After": str(max(1, math.ceil(reset - now)))}
            raise RequestError("Too many failed logins, try again later", 429, retry)
    # The KDF is deliberately slow: keep it off the event loop.
    user = await asyncio.to_thread(users.login, password, found)
    if user is not None and limiter is not None:
        limiter.forgive_login(keys)
    return user


_SESSION = web.RequestKey("web_session", object)  # the Session, or False: none (looked up once)


async def session_of(request: web.Request, fresh: bool = False) -> Session | None:
    """The web session of the request's cookie (api/web), looked up once per request (again
    when `fresh`: a long stream re-checks it); None without a live one. Only pages and the
    rate limiter read it: the API takes tokens and Basic credentials alone, so a session
    cookie never authorizes an API call."""
    if fresh or _SESSION not in request:
        value = request.cookies.get(SESSION_COOKIE, "")
        found: Session | None = None
        if 0 < len(value) <= 100:
            async with request.config_dict[POOL].acquire() as conn:
                found = await sessions.get(conn, value)
        request[_SESSION] = found or False
    stored = request[_SESSION]
    return stored if isinstance(stored, Session) else None
