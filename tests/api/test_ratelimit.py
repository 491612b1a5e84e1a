"""Rate limiting (docs/api.md §20) on a real server application, with small limits."""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid.api.app import create_app
from marid.config import RateLimitConfig
from marid.ratelimit import Limiter
from marid.users import User
from tests.conftest import MakeToken, bearer

MakeClient = Callable[..., Awaitable[TestClient]]
# Windows are fixed and aligned to the epoch: an hour makes a test crossing a boundary (and
# seeing its counts start again) unlikely.
WINDOW = 3600.0


@pytest.fixture
def limited(
    aiohttp_client: MakeClient, config: config_module.Config, pool: asyncpg.Pool
) -> Callable[..., Awaitable[TestClient]]:
    """A server whose rate limit is on, with `authenticated`/`anonymous` limits per WINDOW."""

    async def make(authenticated: int = 3, anonymous: int = 2, **extra: object) -> TestClient:
        settings = RateLimitConfig(
            enabled=True, window=WINDOW, authenticated=authenticated, anonymous=anonymous, **extra
        )  # type: ignore[arg-type]
        return await aiohttp_client(
            create_app(dataclasses.replace(config, rate_limit=settings), pool)
        )

    return make


async def test_a_token_gets_its_limit_then_429(limited, token: MakeToken):
    api = await limited()
    value = await token("build:read")
    remaining = []
    for _ in range(3):
        resp = await api.get("/api/user", headers=bearer(value))
        assert resp.status == 200
        assert resp.headers["X-RateLimit-Limit"] == "3"
        remaining.append(int(resp.headers["X-RateLimit-Remaining"]))
        reset = int(resp.headers["X-RateLimit-Reset"])
        assert time.time() < reset <= time.time() + WINDOW
    assert remaining == [2, 1, 0]
    resp = await api.get("/api/user", headers=bearer(value))
    assert resp.status == 429
    assert await resp.json() == {"message": "Rate limit exceeded"}
    assert resp.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(resp.headers["Retry-After"]) <= WINDOW
    # Another token of the same user has its own count; health and metrics are not counted.
    other = await token("build:read")
    assert (await api.get("/api/user", headers=bearer(other))).status == 200
    for path in ("/api/health", "/api/metrics"):  # answered, with the headers, not counted
        resp = await api.get(path, headers=bearer(value))
        assert resp.status == 200
        assert resp.headers["X-RateLimit-Remaining"] == "0"
    resp = await api.get("/api/health", headers=bearer(other))
    assert resp.headers["X-RateLimit-Remaining"] == "2"  # other's one counted request
    text = await (await api.get("/api/metrics")).text()
    assert "marid_rate_limited_total 1\n" in text


async def test_anonymous_and_invalid_tokens_count_against_the_address(limited):
    api = await limited()
    assert (await api.get("/api/namespaces")).status == 404  # anonymous: counted all the same
    resp = await api.get("/api/user", headers=bearer("mrd_" + "0" * 64))
    assert resp.status == 404
    assert resp.headers["X-RateLimit-Limit"] == "2"
    assert resp.headers["X-RateLimit-Remaining"] == "0"
    assert (await api.get("/api/builds")).status == 429


async def test_basic_credentials_count_against_the_user(limited, alice: User):
    api = await limited(authenticated=2, anonymous=1)
    good = {"Authorization": "Basic " + base64.b64encode(b"alice:password1").decode()}
    for left in ("1", "0"):
        resp = await api.get("/api/tokens", headers=good)
        assert resp.status == 200
        assert resp.headers["X-RateLimit-Remaining"] == left
    assert (await api.get("/api/tokens", headers=good)).status == 429
    bad = {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()}
    resp = await api.get("/api/tokens", headers=bad)
    assert resp.status == 401 and resp.headers["X-RateLimit-Limit"] == "1"


async def test_forwarded_addresses_are_believed_only_from_trusted_proxies(limited):
    forwarded = {"X-Forwarded-For": "203.0.113.7, 10.0.0.1"}
    untrusted = await limited(anonymous=1)
    assert (await untrusted.get("/api/builds", headers=forwarded)).status == 404
    other = {"X-Forwarded-For": "203.0.113.8"}
    assert (await untrusted.get("/api/builds", headers=other)).status == 429  # same peer
    trusting = await limited(anonymous=1, trusted_proxies=["127.0.0.0/8"])
    assert (await trusting.get("/api/builds", headers=forwarded)).status == 404
    assert (await trusting.get("/api/builds", headers=other)).status == 404  # another client
    assert (await trusting.get("/api/builds", headers=forwarded)).status == 429


async def test_streamed_responses_carry_the_headers(limited, token: MakeToken):
    api = await limited(authenticated=10)
    value = await token("build:read,write")
    manifest = "driver: {type: docker, image: busybox, workspace: /w}\n"
    resp = await api.post("/api/builds", headers=bearer(value), json={"manifest": manifest})
    path = (await resp.json())["url"].removeprefix("https://ci.example.com")
    live = {**bearer(value), "Accept": "text/event-stream"}
    resp = await api.get(path + "/jobs/create-driver/output", headers=live)
    try:
        assert resp.headers["Content-Type"].startswith("text/event-stream")  # still streaming
        assert resp.headers["X-RateLimit-Limit"] == "10"
        assert resp.headers["X-RateLimit-Remaining"] == "8"
    finally:
        resp.close()


async def test_disabled_means_no_headers_and_no_429(api: TestClient):
    for _ in range(100):
        resp = await api.get("/api/builds")
        assert resp.status == 404 and "X-RateLimit-Limit" not in resp.headers


def test_windows_are_fixed_and_counts_start_again():
    limiter = Limiter(RateLimitConfig(window=60.0), "/api")
    assert limiter.take("k", 2, 120.0) == (True, 1, 180)
    assert limiter.take("k", 2, 179.9) == (True, 0, 180)
    assert limiter.take("k", 2, 179.99) == (False, 0, 180)
    assert limiter.take("k", 2, 180.0) == (True, 1, 240)
    assert limiter.counts == {"k": 1}  # keys of old windows are dropped
    assert limiter.peek("k", 2, 181.0) == (True, 1, 240)
    assert limiter.peek("k", 2, 182.0) == (True, 1, 240)  # peeking counts nothing
