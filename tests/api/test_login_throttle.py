"""Password guessing (issue 11 rows 6 and 10, docs/api.md §1.5 and §20): failed logins are
limited per user and per client address before any hashing, and unknown users cost the same
scrypt as known ones."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid.api.app import create_app
from marid.config import RateLimitConfig
from tests.api.test_oauth import consent_form, register
from tests.conftest import MakeUser

MakeClient = Callable[..., Awaitable[TestClient]]
WINDOW = 3600.0  # fixed windows aligned to the epoch: an hour makes crossing one unlikely
TOKEN = {"name": "t", "scope": "build:read"}


def basic(handle: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{handle}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


@pytest.fixture
async def throttled(
    aiohttp_client: MakeClient, config: config_module.Config, pool: asyncpg.Pool
) -> TestClient:
    """A server allowing 3 failed logins per user and per address in a window; the request
    limits are high so that only the failed-login budget answers 429."""
    settings = RateLimitConfig(
        enabled=True,
        window=WINDOW,
        authenticated=1000,
        anonymous=1000,
        failed_logins=3,
        trusted_proxies=["127.0.0.0/8", "::1"],
    )
    return await aiohttp_client(create_app(dataclasses.replace(config, rate_limit=settings), pool))


async def answer(resp: Any) -> tuple[int, Any]:
    return resp.status, await resp.json()


async def test_a_throttled_right_password_answers_exactly_as_a_wrong_one(
    throttled: TestClient, make_user: MakeUser
):
    await make_user("alice")
    api = throttled
    app = await register(api)  # a right password: counts for nothing
    for _ in range(2):
        resp = await api.post("/api/tokens", headers=basic("alice", "wrong-one"), json=TOKEN)
        assert resp.status == 401
    # A right password is not a failure: it does not use the budget up.
    resp = await api.post("/api/tokens", headers=basic("alice", "password1"), json=TOKEN)
    assert resp.status == 201
    resp = await api.post("/api/tokens", headers=basic("alice", "wrong-two"), json=TOKEN)
    assert resp.status == 401
    # Three failures: the right password and a wrong one now get the same 429.
    right = await api.post("/api/tokens", headers=basic("alice", "password1"), json=TOKEN)
    wrong = await api.post("/api/tokens", headers=basic("alice", "wrong-three"), json=TOKEN)
    assert await answer(right) == await answer(wrong)
    assert await answer(right) == (429, {"message": "Too many failed logins, try again later"})
    assert 1 <= int(right.headers["Retry-After"]) <= WINDOW
    assert right.headers["Retry-After"] == wrong.headers["Retry-After"]
    # By email too: the budget is the user's, not the spelling's.
    resp = await api.post(
        "/api/tokens", headers=basic("alice@example.com", "password1"), json=TOKEN
    )
    assert resp.status == 429
    # The OAuth login form checks the same budget.
    form = consent_form(app)
    resp = await api.post("/login/oauth/authorize", data=form, allow_redirects=False)
    assert await answer(resp) == (429, {"message": "Too many failed logins, try again later"})


async def test_the_client_address_has_its_own_budget_across_users(
    throttled: TestClient, make_user: MakeUser
):
    await make_user("alice")
    await make_user("bob")
    api = throttled
    for handle in ("alice", "carol", "dave"):  # one failure each: no user's budget is spent
        resp = await api.post("/api/tokens", headers=basic(handle, "wrong"), json=TOKEN)
        assert resp.status == 401
    resp = await api.post("/api/tokens", headers=basic("bob", "password1"), json=TOKEN)
    assert await answer(resp) == (429, {"message": "Too many failed logins, try again later"})
    # From another address (through a trusted proxy) bob's own budget is untouched.
    elsewhere = {**basic("bob", "password1"), "X-Forwarded-For": "192.0.2.7"}
    resp = await api.post("/api/tokens", headers=elsewhere, json=TOKEN)
    assert resp.status == 201


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the standard library's scrypt, which still does the real work."""
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    return calls


async def test_an_unknown_username_costs_the_same_scrypt_as_a_known_one(
    api: TestClient, make_user: MakeUser, scrypt_calls: list[int]
):
    await make_user("alice")
    app = await register(api)
    scrypt_calls.clear()
    resp = await api.post("/api/tokens", headers=basic("alice", "wrong"), json=TOKEN)
    assert (resp.status, len(scrypt_calls)) == (401, 1)
    for handle in ("nobody", "nobody@example.com", ""):
        scrypt_calls.clear()
        resp = await api.post("/api/tokens", headers=basic(handle, "wrong"), json=TOKEN)
        assert (resp.status, len(scrypt_calls)) == (401, 1), handle
    scrypt_calls.clear()
    form = consent_form(app, handle="nobody", password="wrong")
    resp = await api.post("/login/oauth/authorize", data=form, allow_redirects=False)
    assert (resp.status, len(scrypt_calls)) == (401, 1)
