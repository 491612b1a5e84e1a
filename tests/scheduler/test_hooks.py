"""Webhook delivery (docs/api.md §10.7) to real receivers on loopback, with an injected clock for
retries (retried with backoff while the receiver is down, every attempt logged)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from marid import __version__, outbound
from marid import config as config_module
from marid.crypto import Cipher
from marid.scheduler import hooks
from marid.webhooks import Delivery
from tests.api.helpers import create_namespace
from tests.conftest import MakeToken, bearer

ALL = "webhook:read,write,delete namespace:read,write variable:read,write,delete"
HOOKS = "/api/n/alice/team/-/webhooks"
VARIABLE = {"key": "K", "value": "v", "namespace": "team"}


@dataclasses.dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: records what it gets, answers `statuses` in turn.
    With a `secret`, it verifies X-Marid-Signature first and answers 401 when that fails."""

    url: str = ""
    statuses: list[int] = dataclasses.field(default_factory=list)
    got: list[tuple[dict[str, str], bytes]] = dataclasses.field(default_factory=list)
    hold: asyncio.Event | None = None  # when set, requests wait for it before the answer
    secret: str | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        if self.hold is not None:
            await self.hold.wait()
        if self.secret is not None and not verify(
            self.got[-1][0], self.got[-1][1], self.secret, time.time()
        ):
            return web.Response(status=401)
        status = self.statuses.pop(0) if self.statuses else 200
        headers = {"Location": self.url + "/elsewhere"} if 300 <= status < 400 else None
        return web.Response(status=status, headers=headers)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    app.router.add_post("/hook/elsewhere", r.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        r.url = str(server.make_url("/hook"))
        yield r


@pytest.fixture
def config(config: config_module.Config) -> config_module.Config:
    """The receivers listen on loopback: allowed (the refusals are tested with a policy
    without it)."""
    settings = config_module.WebhooksConfig(attempts=3, retry_delay=30.0)
    allow = config_module.OutboundConfig(["127.0.0.0/8"])
    return dataclasses.replace(config, webhooks=settings, outbound=allow)


@pytest.fixture
async def owner(api: TestClient, token: MakeToken) -> str:
    value = await token(ALL)
    await create_namespace(api, value, "team")
    return value


@pytest.fixture
async def client(config: config_module.Config) -> AsyncIterator[aiohttp.ClientSession]:
    async with hooks.session(config.webhooks, outbound.Policy.from_config(config)) as session:
        yield session


async def hook(api: TestClient, token: str, url: str, **fields: Any) -> dict[str, Any]:
    resp = await api.post(HOOKS, headers=bearer(token), json={"payload_url": url, **fields})
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


async def deliver(
    pool: asyncpg.Pool, client: aiohttp.ClientSession, config: config_module.Config, at: datetime
) -> int:
    cipher = Cipher(config.crypto.key)
    policy = outbound.Policy.from_config(config)
    return await hooks.deliver_due(pool, client, cipher, policy, config.webhooks, at)


async def log_of(api: TestClient, token: str, hook_id: int) -> list[dict[str, Any]]:
    resp = await api.get(f"{HOOKS}/{hook_id}/deliveries", headers=bearer(token))
    assert resp.status == 200
    return list(await resp.json())


def verify(headers: dict[str, str], body: bytes, secret: str, now: float) -> bool:
    """A receiver's check, as docs/api.md §10.7 describes it: the HMAC of
    `<timestamp>.<delivery id>.<body>` matches, and the timestamp is at most 5 minutes off."""
    timestamp, delivery = headers["X-Marid-Timestamp"], headers["X-Marid-Delivery"]
    signed = f"{timestamp}.{delivery}.".encode() + body
    expected = "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    fresh = abs(now - int(timestamp)) <= 300
    return hmac.compare_digest(expected, headers.get("X-Marid-Signature", "")) and fresh


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_each_event_arrives_once_signed(
    api: TestClient, owner: str, pool: asyncpg.Pool, receiver: Receiver, client: Any, config: Any
):
    created = await hook(api, owner, receiver.url, secret="s3cret")
    resp = await api.post("/api/variables", headers=bearer(owner), json=VARIABLE)
    variable = await resp.json()
    await api.delete(f"/api/variables/{variable['id']}", headers=bearer(owner))
    now = datetime.now(UTC) + timedelta(seconds=1)
    assert await deliver(pool, client, config, now) == 2
    assert await deliver(pool, client, config, now + timedelta(days=1)) == 0  # once each
    assert len(receiver.got) == 2
    actions = []
    for headers, body in receiver.got:
        expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert headers["X-Djinn-CI-Signature"] == f"sha256={expected}"
        assert headers["X-Djinn-CI-Event"] == "variables"
        assert headers["X-Djinn-CI-Hook-ID"] == str(created["id"])
        assert headers["Content-Type"] == "application/json; charset=utf-8"
        assert headers["Accept"] == "*/*"
        assert headers["User-Agent"] == f"marid-hook/{__version__}"
        payload = json.loads(body)
        assert payload["variable"] == variable
        actions.append(payload["action"])
    assert sorted(actions) == ["created", "deleted"]
    shown = await (await api.get(f"{HOOKS}/{created['id']}", headers=bearer(owner))).json()
    last = shown["last_response"]
    assert last["code"] == 200 and last["error"] is None and last["duration"] > 0
    log = await log_of(api, owner, created["id"])
    assert [(a["event"], a["attempt"], a["code"], a["state"]) for a in log] == [
        ("variables", 1, 200, "delivered"),
        ("variables", 1, 200, "delivered"),
    ]


async def test_no_secret_no_signature(
    api: TestClient, owner: str, pool: asyncpg.Pool, receiver: Receiver, client: Any, config: Any
):
    await hook(api, owner, receiver.url)
    await api.post("/api/variables", headers=bearer(owner), json=VARIABLE)
    assert await deliver(pool, client, config, datetime.now(UTC) + timedelta(seconds=1)) == 1
    [(headers, _)] = receiver.got
    assert "X-Djinn-CI-Signature" not in headers
    assert "X-Marid-Signature" not in headers
    assert headers["X-Marid-Delivery"] and headers["X-Marid-Timestamp"]  # for dedupe all the same


async def test_the_marid_signature_covers_timestamp_delivery_id_and_body(
    api: TestClient, owner: str, pool: asyncpg.Pool, receiver: Receiver, client: Any, config: Any
):
    """A receiver that verifies X-Marid-Signature accepts every attempt; the delivery id is
    the same on a retry, so a receiver that saw it can drop the repeat."""
    created = await hook(api, owner, receiver.url, secret="s3cret")
    receiver.secret = "s3cret"
    receiver.statuses = [503]
    await api.post("/api/variables", headers=bearer(owner), json=VARIABLE)
    t0 = datetime.now(UTC) + timedelta(seconds=1)
    before = int(time.time())
    assert await deliver(pool, client, config, t0) == 1
    assert await deliver(pool, client, config, t0 + timedelta(seconds=30)) == 1
    log = await log_of(api, owner, created["id"])
    assert [(a["attempt"], a["code"]) for a in log] == [(2, 200), (1, 503)]  # none was a 401
    [(first, body), (second, again)] = receiver.got
    assert body == again
    assert first["X-Marid-Delivery"] == second["X-Marid-Delivery"] == str(log[0]["delivery_id"])
    for headers in (first, second):
        assert before <= int(headers["X-Marid-Timestamp"]) <= time.time()
        expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert headers["X-Djinn-CI-Signature"] == f"sha256={expected}"  # Djinn's, unchanged
    # What a receiver refuses: a replay older than 5 minutes, another body, another id.
    now = time.time()
    assert verify(first, body, "s3cret", now)
    assert not verify(first, body, "s3cret", now + 301)
    assert not verify(first, body + b" ", "s3cret", now)
    assert not verify({**first, "X-Marid-Delivery": "1" + first["X-Marid-Delivery"]}, body,
                      "s3cret", now)  # fmt: skip
    assert not verify(first, body, "other secret", now)


def test_each_attempt_has_its_own_timestamp_and_the_delivery_its_id():
    delivery = Delivery(7, 3, "https://hooks.example.org/", None, "objects",
                                        b'{"a":1}', 1)  # fmt: skip
    one, two = hooks.headers(delivery, "s", 1000), hooks.headers(delivery, "s", 1060)
    assert one["X-Marid-Delivery"] == two["X-Marid-Delivery"] == "7"
    assert (one["X-Marid-Timestamp"], two["X-Marid-Timestamp"]) == ("1000", "1060")
    signed = hmac.new(b"s", b'1000.7.{"a":1}', hashlib.sha256).hexdigest()
    assert one["X-Marid-Signature"] == f"sha256={signed}"
    assert one["X-Marid-Signature"] != two["X-Marid-Signature"]
    assert one["X-Djinn-CI-Signature"] == two["X-Djinn-CI-Signature"]


async def test_a_receiver_that_is_down_is_retried_with_backoff_and_logged(
    api: TestClient, owner: str, pool: asyncpg.Pool, client: Any, config: Any
):
    created = await hook(api, owner, f"http://127.0.0.1:{closed_port()}/hook")
    await api.post("/api/variables", headers=bearer(owner), json=VARIABLE)
    t0 = datetime.now(UTC) + timedelta(seconds=1)
    assert await deliver(pool, client, config, t0) == 1
    assert await deliver(pool, client, config, t0 + timedelta(seconds=29)) == 0  # not yet
    assert await deliver(pool, client, config, t0 + timedelta(seconds=30)) == 1
    assert await deliver(pool, client, config, t0 + timedelta(seconds=149)) == 0
    assert await deliver(pool, client, config, t0 + timedelta(seconds=150)) == 1  # 30 s x 4
    assert await deliver(pool, client, config, t0 + timedelta(days=1)) == 0  # 3 attempts: done
    log = await log_of(api, owner, created["id"])
    assert [(a["attempt"], a["code"], a["state"]) for a in log] == [
        (3, None, "failed"),
        (2, None, "failed"),
        (1, None, "failed"),
    ]
    assert all("Connect" in a["error"] for a in log), log
    times = [datetime.fromisoformat(a["created_at"]) for a in reversed(log)]
    assert times == [t0, t0 + timedelta(seconds=30), t0 + timedelta(seconds=150)]
    shown = await (await api.get(f"{HOOKS}/{created['id']}", headers=bearer(owner))).json()
    assert shown["last_response"]["code"] is None
    assert shown["last_response"]["error"] == log[0]["error"]


async def test_a_server_error_is_retried_and_other_answers_are_final(
    api: TestClient, owner: str, pool: asyncpg.Pool, receiver: Receiver, client: Any, config: Any
):
    created = await hook(api, owner, receiver.url)
    receiver.statuses = [503, 404]
    await api.post("/api/variables", headers=bearer(owner), json=VARIABLE)
    t0 = datetime.now(UTC) + timedelta(seconds=1)
    assert await deliver(pool, client, config, t0) == 1
    assert await deliver(pool, client, config, t0 + timedelta(seconds=30)) == 1
    assert await deliver(pool, client, config, t0 + timedelta(days=1)) == 0
    log = await log_of(api, owner, created["id"])
    assert [(a["attempt"], a["code"], a["error"]) for a in log] == [(2, 404, None), (1, 503, None)]
    assert len(receiver.got) == 2
    assert receiver.got[0][1] == receiver.got[1][1]  # the same bytes on every attempt


async def test_redirects_are_not_followed(
    api: TestClient, owner: str, pool: asyncpg.Pool, receiver: Receiver, client: Any, config: Any
):
    created = await hook(api, owner, receiver.url)
    receiver.statuses = [302]
    await api.post("/api/variables", headers=bearer(owner), json=VARIABLE)
    assert await deliver(pool, client, config, datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert len(receiver.got) == 1
    [attempt] = await log_of(api, owner, created["id"])
    assert (attempt["code"], attempt["state"]) == (302, "delivered")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.1", "0x7f000001"])
async def test_loopback_targets_are_refused_when_the_config_forbids_them(
    api: TestClient, owner: str, pool: asyncpg.Pool, receiver: Receiver, config: Any, host: str
):
    """A webhook made while loopback was allowed, delivered by a scheduler that forbids it: a
    name that resolves to loopback is refused by the resolver, a literal before connecting.
    The log says that and nothing else: a closed port reads the same as the open one."""
    port = receiver.url.split(":")[2].split("/")[0]
    open_hook = await hook(api, owner, f"http://{host}:{port}/hook")
    closed_hook = await hook(api, owner, f"http://{host}:{closed_port()}/hook")
    await api.post("/api/variables", headers=bearer(owner), json=VARIABLE)
    strict = outbound.Policy()
    async with hooks.session(config.webhooks, strict) as guarded:
        cipher = Cipher(config.crypto.key)
        at = datetime.now(UTC) + timedelta(seconds=1)
        assert await hooks.deliver_due(pool, guarded, cipher, strict, config.webhooks, at) == 2
    assert receiver.got == []
    [attempt] = await log_of(api, owner, open_hook["id"])
    [closed] = await log_of(api, owner, closed_hook["id"])
    shown = "localhost" if host == "localhost" else "127.0.0.1"
    assert attempt["error"] == f"{shown} is refused by policy (loopback); see outbound.allow"
    assert (closed["error"], closed["code"]) == (attempt["error"], None)
    if host != "localhost":  # a literal, refused before sending: no retry would fare better
        assert attempt["state"] == closed["state"] == "failed"


async def test_old_records_are_purged(
    api: TestClient, owner: str, pool: asyncpg.Pool, receiver: Receiver, client: Any, config: Any
):
    from marid import webhooks

    created = await hook(api, owner, receiver.url)
    await api.post("/api/variables", headers=bearer(owner), json=VARIABLE)
    now = datetime.now(UTC) + timedelta(seconds=1)
    await deliver(pool, client, config, now)
    async with pool.acquire() as conn:
        await webhooks.purge(conn, now + timedelta(days=29))
        assert len(await log_of(api, owner, created["id"])) == 1
        await conn.execute(
            "UPDATE webhook_deliveries SET created_at = created_at - interval '31 days'"
        )
        await webhooks.purge(conn, now + timedelta(days=31))
        assert await log_of(api, owner, created["id"]) == []
        assert await conn.fetchval("SELECT count(*) FROM webhook_deliveries") == 0


async def test_the_running_service_delivers_when_an_event_is_queued(
    api: TestClient, owner: str, receiver: Receiver, config: config_module.Config
):
    await hook(api, owner, receiver.url)
    stop = asyncio.Event()
    service = asyncio.create_task(hooks.run(config, stop))
    try:
        await asyncio.sleep(0.5)  # listening
        await api.post("/api/variables", headers=bearer(owner), json=VARIABLE)
        for _ in range(100):  # woken by NOTIFY, well before the 5 s poll
            if receiver.got:
                break
            await asyncio.sleep(0.05)
        assert len(receiver.got) == 1
    finally:
        stop.set()
        await asyncio.wait_for(service, 10)


async def test_cron_builds_send_build_submitted(
    api: TestClient, owner: str, pool: asyncpg.Pool, token: MakeToken, config: Any
):
    from marid.scheduler import loop

    value = await token("webhook:write namespace:write build:read cron:write")
    await create_namespace(api, value, "other")
    await hook(api, owner, "https://hooks.example.org/ci", events=["build.submitted"])
    manifest = "driver: {type: docker, image: busybox, workspace: /w}\nnamespace: %s\n"
    for name, space in (("team job", "team"), ("other job", "other")):
        resp = await api.post(
            "/api/cron", headers=bearer(value), json={"name": name, "manifest": manifest % space}
        )
        assert resp.status == 201, await resp.text()
    async with pool.acquire() as conn:
        await conn.execute("UPDATE crons SET next_run = now() - interval '1 minute'")
    assert await loop.tick(pool, datetime.now(UTC), 10, config) == 2
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT event, body FROM webhook_deliveries")
    [(event, body)] = [(row["event"], json.loads(row["body"])) for row in rows]
    assert event == "build.submitted"
    shown = await (await api.get(body["url"].removeprefix("https://ci.example.com"),
                                 headers=bearer(value))).json()  # fmt: skip
    assert body == shown
    assert shown["namespace"]["path"] == "team" and "cron:team-job" in shown["tags"]


async def test_a_webhook_deleted_while_its_delivery_is_in_flight_logs_nothing(
    api: TestClient, owner: str, pool: asyncpg.Pool
):
    from marid import webhooks

    created = await hook(api, owner, "https://hooks.example.org/ci")
    await api.post("/api/variables", headers=bearer(owner), json=VARIABLE)
    now = datetime.now(UTC) + timedelta(seconds=1)
    async with pool.acquire() as conn:
        [delivery] = await webhooks.claim_due(conn, now, 10, hooks.LEASE)
    resp = await api.delete(f"{HOOKS}/{created['id']}", headers=bearer(owner))
    assert resp.status == 204
    async with pool.acquire() as conn:
        await webhooks.record(conn, delivery, webhooks.Outcome(200, 5, None), now, None)
        assert await conn.fetchval("SELECT count(*) FROM webhook_attempts") == 0


async def test_with_every_slot_busy_the_service_waits_instead_of_polling(
    api: TestClient,
    owner: str,
    receiver: Receiver,
    config: config_module.Config,
    monkeypatch: pytest.MonkeyPatch,
):
    """One slot, a receiver that holds the first request: the second event waits for the
    slot without the service spinning on the queue meanwhile."""
    from marid import webhooks

    looks = 0
    next_due = webhooks.next_due

    async def counted(conn: asyncpg.Connection) -> datetime | None:
        nonlocal looks
        looks += 1
        return await next_due(conn)

    monkeypatch.setattr(webhooks, "next_due", counted)
    release = receiver.hold = asyncio.Event()
    one_slot = dataclasses.replace(
        config, webhooks=dataclasses.replace(config.webhooks, concurrency=1)
    )
    await hook(api, owner, receiver.url)
    stop = asyncio.Event()
    service = asyncio.create_task(hooks.run(one_slot, stop))
    try:
        await asyncio.sleep(0.5)
        await api.post("/api/variables", headers=bearer(owner), json=VARIABLE)
        await api.post("/api/variables", headers=bearer(owner), json={**VARIABLE, "key": "L"})
        for _ in range(100):
            if receiver.got:
                break
            await asyncio.sleep(0.02)
        before = looks
        await asyncio.sleep(1.0)  # the first request is held; the second event is due
        assert len(receiver.got) == 1  # the second waits for the only slot
        assert looks - before <= 2, looks - before
        release.set()
        for _ in range(100):
            if len(receiver.got) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(receiver.got) == 2
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(service, 10)
