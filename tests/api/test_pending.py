"""A queued build says why it waits (issue 12 part 3, docs/api.md §7.1): `pending.reason`,
read from the runners alive now, in the build, its listings and the submission's answer."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import lifecycle, runners
from marid.api.app import create_app
from marid.config import Config
from tests.conftest import MakeToken, bearer

SCOPE = "build:read,write,delete namespace:read,write"
QEMU = "driver: {type: qemu, image: debian}\n"
DOCKER = "driver: {type: docker, image: alpine, workspace: /w}\n"
NO_RUNNER = {"reason": "no runner is running", "position": 1}
NO_QEMU = {"reason": "no runner offers driver qemu", "position": 1}
WAITING = {"reason": "waiting for a runner slot (0 ahead)", "position": 1}


@pytest.fixture
def qemu_config(config: Config) -> Config:
    """`qemu` enabled on the server, whether or not a runner offers it."""
    return dataclasses.replace(config, drivers=["docker", "os", "qemu"])


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], qemu_config: Config, pool: asyncpg.Pool
) -> TestClient:
    return await aiohttp_client(create_app(qemu_config, pool))


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as connection:
        yield connection


class Api:
    def __init__(self, client: TestClient, token: str) -> None:
        self.client, self.token = client, token

    async def submit(self, manifest: str) -> dict[str, Any]:
        resp = await self.client.post(
            "/api/builds", headers=bearer(self.token), json={"manifest": manifest}
        )
        assert resp.status == 201, await resp.text()
        return dict(await resp.json())

    async def get(self, path: str) -> Any:
        resp = await self.client.get(f"/api{path}", headers=bearer(self.token))
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def pending(self, number: int) -> Any:
        """`pending` of alice's build `number`, and of it in the queued listing."""
        build = await self.get(f"/b/alice/{number}")
        listed = {b["number"]: b for b in await self.get("/builds?status=queued")}
        assert listed[number]["pending"] == build["pending"]
        return build["pending"]


@pytest.fixture
async def api(client: TestClient, token: MakeToken) -> Api:
    return Api(client, await token(SCOPE))


async def test_with_no_runner_at_all_a_queued_build_says_so(api: Api):
    submitted = await api.submit(DOCKER)
    assert submitted["pending"] == NO_RUNNER
    assert await api.pending(1) == NO_RUNNER


async def test_a_qemu_build_says_no_runner_offers_qemu_until_one_is_alive(
    api: Api, conn: asyncpg.Connection
):
    await runners.announce(conn, "docker-host", ["docker", "os"], 2)
    assert (await api.submit(QEMU))["pending"] == NO_QEMU
    assert await api.pending(1) == NO_QEMU

    await runners.announce(conn, "vm-host", ["qemu"], 1)
    assert await api.pending(1) == WAITING

    # vm-host's announcements stop: three of its intervals later it no longer counts.
    await conn.execute(
        "UPDATE runners SET last_seen_at = now() - make_interval(secs => 3 * $1 + 1)"
        " WHERE name = 'vm-host'",
        runners.INTERVAL,
    )
    assert await api.pending(1) == NO_QEMU

    await runners.announce(conn, "vm-host", ["qemu"], 1)  # back
    assert await api.pending(1) == WAITING
    await runners.withdraw(conn, "vm-host")  # stopped cleanly
    assert await api.pending(1) == NO_QEMU
    await runners.withdraw(conn, "docker-host")
    assert await api.pending(1) == NO_RUNNER


async def test_only_queued_builds_have_a_pending_reason(
    api: Api, conn: asyncpg.Connection, qemu_config: Config
):
    await runners.announce(conn, "docker-host", ["docker"], 2)
    await api.submit(DOCKER)  # 1: claimed below, running
    await api.submit(DOCKER)  # 2: killed while queued
    await api.submit(QEMU)  # 3: still queued
    async with conn.transaction():
        claim = await lifecycle.claim(conn, "docker-host", ["docker"], qemu_config.runner.lease)
    assert claim is not None
    resp = await api.client.delete("/api/b/alice/2", headers=bearer(api.token))
    assert resp.status == 204

    listed = {b["number"]: (b["status"], b["pending"]) for b in await api.get("/builds")}
    assert listed == {1: ("running", None), 2: ("killed", None), 3: ("queued", NO_QEMU)}
    assert (await api.get("/b/alice/1"))["pending"] is None
    assert (await api.get("/b/alice/2"))["pending"] is None


async def test_a_namespaces_latest_build_says_why_it_waits(api: Api):
    resp = await api.client.post(
        "/api/namespaces", headers=bearer(api.token), json={"name": "team"}
    )
    assert resp.status == 201
    await api.submit("namespace: team\n" + QEMU)
    assert (await api.get("/n/alice/team"))["build"]["pending"] == NO_RUNNER
    [listed] = await api.get("/namespaces")
    assert listed["build"]["pending"] == NO_RUNNER


async def test_a_listing_reads_the_runners_once_for_its_whole_page(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    qemu_config: Config,
    token: MakeToken,
    conn: asyncpg.Connection,
):
    queries: list[str] = []

    async def log_queries(connection: asyncpg.Connection) -> None:
        connection.add_query_logger(lambda logged: queries.append(logged.query))

    pool = await asyncpg.create_pool(
        qemu_config.database.dsn,
        min_size=1,
        max_size=2,
        init=log_queries,
        server_settings={"timezone": "UTC"},  # as marid/db.py create_pool
    )
    try:
        api = Api(await aiohttp_client(create_app(qemu_config, pool)), await token(SCOPE))
        await runners.announce(conn, "docker-host", ["docker"], 2)
        for _ in range(5):
            await api.submit(QEMU)
        await api.submit(DOCKER)
        queries.clear()
        listed = await api.get("/builds")
        no_qemu = [{**NO_QEMU, "position": n} for n in (5, 4, 3, 2, 1)]
        assert [b["pending"] for b in listed] == [WAITING, *no_qemu]
        assert sum("runners" in query for query in queries) == 1
    finally:
        await pool.close()
