"""The scheduler rides out a database outage (issue 10 part 1, docs/architecture.md §1): PostgreSQL
stops while the cron loop and the webhook deliverer run; a cron job comes due and a queued
delivery becomes due meanwhile; once PostgreSQL is back both are done, once, by the same
services, and each service logged the outage once, not once per try.

The test stops the database, so it runs on a cluster of its own (tests/fixtures/outage.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from marid import config as config_module
from marid import crons, scopes, tokens, users
from marid.api.app import create_app
from marid.pgcluster import Cluster
from marid.scheduler import hooks, loop
from tests.conftest import bearer
from tests.fixtures.outage import start_database, stop_database

Client = Callable[..., Awaitable[TestClient]]
SCOPE = (
    "build:read,write cron:read,write namespace:read,write webhook:read,write variable:read,write"
)
MANIFEST = "driver: {type: docker, image: busybox, workspace: /w}\n"
# The services' clock reads an hour before the cron job's run at first, and before the
# delivery, which is stamped with the real time: nothing is due until the test moves it.
NOON = datetime(2020, 6, 1, 12, 0, tzinfo=UTC)
WAIT, STEP = 120.0, 0.05  # seconds: a bound on every wait, and the polling step
SERVICES = ("marid.scheduler.loop", "marid.scheduler.hooks")


class Clock:
    """Wall-clock time moved to read NOON - 1 h, until `real` puts it back."""

    def __init__(self) -> None:
        self.offset = NOON - timedelta(hours=1) - datetime.now(UTC)

    def real(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclasses.dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 that records the bodies it gets."""

    url: str = ""
    got: list[bytes] = dataclasses.field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append(await request.read())
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        r.url = str(server.make_url("/hook"))
        yield r


def settings(dsn: str, tmp_path: Path, **more: Any) -> dict[str, Any]:
    """A configuration (as YAML would give it) for a database on the outage cluster: loopback
    webhooks allowed, a scheduler that looks at the cron jobs every second."""
    return {
        "server": {"url": "https://ci.example.com"},
        "database": {"dsn": dsn, "pool_size": 4},
        "crypto": {"key": "test-crypto-key-" + "0" * 32},
        "storage": {"backend": "fs", "path": str(tmp_path / "blobs")},
        "docker": {"pull": "never"},
        "rate_limit": {"enabled": False},
        "webhooks": {"allow_loopback": True},
        "cron": {"interval": "1s"},
        **more,
    }


async def owner_token(dsn: str) -> str:
    """A token of alice's for crons, namespaces, webhooks and variables."""
    conn = await asyncpg.connect(dsn)
    try:
        alice = await users.create(conn, "alice", "alice@example.com", "password1")
        _, value = await tokens.create(conn, alice, "outage", scopes.parse(SCOPE))
    finally:
        await conn.close()
    return value


async def post(api: TestClient, token: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await api.post(f"/api{path}", headers=bearer(token), json=body)
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


async def hook_and_cron(api: TestClient, token: str, receiver: Receiver) -> int:
    """A namespace `team` with a webhook to `receiver`, and a cron job running at noon; returns
    the cron job's id."""
    await post(api, token, "/namespaces", {"name": "team"})
    await post(api, token, "/n/alice/team/-/webhooks", {"payload_url": receiver.url})
    body = {"name": "noon", "schedule": "0 12 * * *", "manifest": MANIFEST}
    return int((await post(api, token, "/cron", body))["id"])


async def queue_delivery(api: TestClient, token: str) -> None:
    """Queue one webhook delivery (a variable's event in `team`)."""
    await post(api, token, "/variables", {"key": "K", "value": "v", "namespace": "team"})


async def until(what: str, condition: Callable[[], object]) -> None:
    """Poll `condition` until it is true; fail naming `what` after WAIT seconds."""
    for _ in range(int(WAIT / STEP)):
        if condition():
            return
        await asyncio.sleep(STEP)
    raise AssertionError(f"still waiting after {WAIT:g}s for {what}")


async def runs_and_builds(dsn: str, cron_id: int) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        runs = await conn.fetchval("SELECT count(*) FROM cron_runs WHERE cron_id = $1", cron_id)
        made = await conn.fetchval("SELECT count(*) FROM builds WHERE cron_id = $1", cron_id)
    finally:
        await conn.close()
    return int(runs), int(made)


def records(caplog: pytest.LogCaptureFixture, name: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name and r.levelno == level]


def warned(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether both services logged a warning."""
    return all(records(caplog, name, logging.WARNING) for name in SERVICES)


def logged(caplog: pytest.LogCaptureFixture, name: str, *words: str) -> bool:
    """Whether `name` logged a line at INFO holding every one of `words`."""
    lines = records(caplog, name, logging.INFO)
    return any(all(word in line for word in words) for line in lines)


class Passes:
    """Counts the cron loop's passes by watching it go to sleep again."""

    def __init__(self, alarm: loop.Alarm) -> None:
        self.alarm = alarm
        self.seen: set[datetime] = set()

    def count(self) -> int:
        if self.alarm.sleeping_until is not None:
            self.seen.add(self.alarm.sleeping_until)
        return len(self.seen)

    async def more(self, n: int) -> None:
        """Wait until the loop has gone to sleep `n` more times."""
        target = self.count() + n
        await until(f"{n} more passes of the cron loop", lambda: self.count() >= target)


async def test_the_scheduler_rides_out_an_outage_and_then_fires_and_delivers_once(
    aiohttp_client: Client,
    outage_cluster: Cluster,
    outage_dsn: str,
    receiver: Receiver,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    caplog.set_level(logging.INFO)
    config = config_module.from_dict(settings(outage_dsn, tmp_path))
    clock = Clock()
    monkeypatch.setattr(crons, "now", clock)  # the API computes next_run on the same clock
    api = await aiohttp_client(create_app(config))
    token = await owner_token(outage_dsn)
    cron_id = await hook_and_cron(api, token, receiver)
    stop = asyncio.Event()
    alarm = loop.Alarm(clock)
    passes = Passes(alarm)
    services = [
        asyncio.create_task(loop.run(config, stop, alarm=alarm)),
        asyncio.create_task(hooks.run(config, stop, clock=clock)),
    ]
    try:
        await until("the cron loop to listen", lambda: alarm.connections == 1)
        await queue_delivery(api, token)  # pending, and due only at the real time
        await passes.more(2)
        assert receiver.got == []
        assert await runs_and_builds(outage_dsn, cron_id) == (0, 0)

        await stop_database(outage_cluster)
        clock.real()  # during the outage, the cron job and the delivery come due
        await until("both services to notice the outage", lambda: warned(caplog))
        await passes.more(4)  # the cron loop failed again and again: still one warning
        assert receiver.got == []

        await start_database(outage_cluster)
        await until("the delivery", lambda: receiver.got)
        await until(
            "the cron loop to work again", lambda: records(caplog, SERVICES[0], logging.INFO)
        )
        await passes.more(3)  # more passes: nothing fires twice
        assert await runs_and_builds(outage_dsn, cron_id) == (1, 1)
        assert len(receiver.got) == 1
        assert all(not task.done() for task in services)
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*services)

    for service, name in zip(SERVICES, ("scheduler tick", "webhook delivery"), strict=True):
        [warning] = records(caplog, service, logging.WARNING)
        assert warning.startswith(f"{name} failed, retrying until it works: ")
        assert any(
            m.startswith(f"{name} works again") for m in records(caplog, service, logging.INFO)
        )
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []  # no traceback per try
    # The two LISTEN connections (marid/listen.py) log the outage once each too.
    assert len(records(caplog, "marid.listen", logging.WARNING)) <= 2
