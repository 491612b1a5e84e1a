"""A database outage answers 503 with Retry-After, /health says why, and the same process
serves again once PostgreSQL is back (docs/api.md §1.4, §21; issue 10).

These tests stop and start PostgreSQL, so they run on a cluster of their own, never the
session's shared one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid import scopes, tokens, users
from marid.api import errors
from marid.api.app import create_app
from marid.pgcluster import Cluster, free_port
from tests.api.test_tokens import basic
from tests.conftest import base_config, bearer
from tests.fixtures.outage import start_database, stop_database

Client = Callable[..., Awaitable[TestClient]]
UNAVAILABLE = {"message": "The database is unavailable; try again shortly"}
HEALTHY = {"status": "ok", "database": "ok", "version": "0.1.0"}
WAIT, STEP = 120.0, 0.05  # seconds: a generous bound on waiting, and the polling step
_numbers = itertools.count()


@pytest.fixture
def cluster(outage_cluster: Cluster) -> Cluster:
    return outage_cluster


@pytest.fixture
def dsn(outage_dsn: str) -> str:
    return outage_dsn


@pytest.fixture
def own_config(dsn: str, tmp_path: Path) -> config_module.Config:
    return base_config(dsn, tmp_path)


@pytest.fixture
async def client(aiohttp_client: Client, own_config: config_module.Config) -> TestClient:
    """The whole application with a pool of its own, as `marid serve` runs it."""
    return await aiohttp_client(create_app(own_config))


@pytest.fixture
async def token(dsn: str) -> str:
    """A token of alice's (password `password1`) allowed to do everything these tests do."""
    conn = await asyncpg.connect(dsn)
    try:
        alice = await users.create(conn, "alice", "alice@example.com", "password1")
        scope = scopes.parse("build:read,write namespace:read,write")
        _, value = await tokens.create(conn, alice, "outage", scope)
    finally:
        await conn.close()
    return value


async def until(what: str, condition: Callable[[], bool]) -> None:
    """Poll `condition` until it is true; fail naming `what` after WAIT seconds."""
    for _ in range(int(WAIT / STEP)):
        if condition():
            return
        await asyncio.sleep(STEP)
    raise AssertionError(f"still waiting after {WAIT:g}s for {what}")


def watch_messages(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "marid.api.live"]


async def assert_unavailable(resp: ClientResponse) -> None:
    assert resp.status == 503, await resp.text()
    assert resp.headers["Retry-After"] == "5"
    assert await resp.json() == UNAVAILABLE


async def test_an_outage_is_a_503_with_retry_after_until_the_database_is_back(
    client: TestClient, cluster: Cluster, token: str, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    assert (await client.get("/api/user", headers=bearer(token))).status == 200
    await stop_database(cluster)  # the app keeps serving meanwhile

    for _ in range(3):  # every request is answered; the outage is logged once
        await assert_unavailable(await client.get("/api/user", headers=bearer(token)))
        await assert_unavailable(await client.get("/api/builds", headers=bearer(token)))
        await assert_unavailable(
            await client.post("/api/namespaces", headers=bearer(token), json={"name": "ns1"})
        )
    resp = await client.get("/api/health")
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "5"
    assert await resp.json() == {
        "status": "unavailable",
        "database": "unavailable",
        "version": "0.1.0",
        "reason": "not reachable",
        "message": "The database is unavailable; try again shortly",
    }

    await start_database(cluster)
    resp = await client.get("/api/user", headers=bearer(token))  # the same app, not restarted
    assert resp.status == 200
    assert (await resp.json())["username"] == "alice"
    resp = await client.post("/api/namespaces", headers=bearer(token), json={"name": "ns1"})
    assert resp.status == 201
    resp = await client.get("/api/health")
    assert resp.status == 200
    assert await resp.json() == HEALTHY

    await until("the watch to see the return", lambda: len(watch_messages(caplog)) == 2)
    (down_level, down), (up_level, up) = watch_messages(caplog)
    assert down_level == logging.WARNING and down.startswith("database unavailable (")
    assert up_level == logging.INFO and up.startswith("database available again after ")
    assert not [r for r in caplog.records if r.name == "marid.api.errors"]  # no 500 logged
    assert cluster.password not in caplog.text


async def test_a_database_closed_to_connections_is_an_outage_too(
    client: TestClient, cluster: Cluster, dsn: str, token: str
):
    name = dsn.rsplit("/", 1)[1]
    admin = await asyncpg.connect(cluster.dsn())
    try:  # every connection dropped, new ones refused (55000) until it is open again
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await assert_unavailable(await client.get("/api/user", headers=bearer(token)))
        resp = await client.get("/api/health")
        assert resp.status == 503
        assert (await resp.json())["reason"] == "not accepting connections"
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    assert (await client.get("/api/user", headers=bearer(token))).status == 200
    assert (await client.get("/api/health")).status == 200


async def test_oauth_endpoints_at_the_server_root_answer_503(
    client: TestClient, cluster: Cluster, token: str
):
    body = {"name": "dash", "homepage_uri": "https://d.example", "redirect_uri": "https://d.ex/cb"}
    resp = await client.post("/api/apps", headers=basic(), json=body)
    assert resp.status == 201, await resp.text()
    app = await resp.json()
    await stop_database(cluster)

    query = {"client_id": app["client_id"], "scope": "build:read", "state": "s"}
    await assert_unavailable(await client.get("/login/oauth/authorize", params=query))
    form = {**query, "handle": "alice", "password": "password1", "authorize": "true"}
    await assert_unavailable(await client.post("/login/oauth/authorize", data=form))
    code = {"client_id": app["client_id"], "client_secret": app["client_secret"], "code": "c"}
    await assert_unavailable(await client.post("/login/oauth/token", data=code))
    await assert_unavailable(await client.post("/logout/oauth/revoke", headers=bearer(token)))

    await start_database(cluster)
    resp = await client.get("/login/oauth/authorize", params=query)
    assert resp.status == 200
    assert resp.content_type == "text/html"


async def test_a_live_output_stream_ends_cleanly_when_the_database_goes(
    client: TestClient, cluster: Cluster, token: str
):
    manifest = "driver: {type: docker, image: busybox, workspace: /w}\n"
    resp = await client.post("/api/builds", headers=bearer(token), json={"manifest": manifest})
    assert resp.status == 201, await resp.text()
    output = (await resp.json())["url"].removeprefix("https://ci.example.com")
    output += "/jobs/create-driver/output"
    live = {**bearer(token), "Accept": "text/event-stream"}
    resp = await client.get(output, headers=live)  # a queued job: the stream stays open
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    await stop_database(cluster)

    async with asyncio.timeout(WAIT):
        rest = await resp.content.read()  # ends, without a transport error
    assert b"Internal Server Error" not in rest
    assert b"message" not in rest

    await assert_unavailable(await client.get(output, headers=live))  # not yet back
    await start_database(cluster)
    resp = await client.get(output, headers=bearer(token))
    assert resp.status == 200
    assert resp.headers["X-Marid-Job-Status"] == "queued"


async def test_clients_looping_through_an_outage_see_only_successes_and_503s(
    client: TestClient, cluster: Cluster, token: str, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    seen: dict[str, list[int]] = {"user": [], "namespace": [], "health": []}
    names = itertools.count()

    async def request(kind: str) -> int:
        if kind == "user":
            resp = await client.get("/api/user", headers=bearer(token))
        elif kind == "namespace":  # a write in a transaction, cut off mid-way by the stop
            body = {"name": f"ns{next(names)}"}
            resp = await client.post("/api/namespaces", headers=bearer(token), json=body)
        else:
            resp = await client.get("/api/health")
        if resp.status == 503:
            assert resp.headers["Retry-After"] == "5"
        await resp.read()
        return resp.status

    async def loop(kind: str) -> None:
        while True:
            seen[kind].append(await request(kind))
            await asyncio.sleep(0.01)

    def count(status: int) -> int:
        return min(statuses.count(status) for statuses in seen.values())

    loops = [asyncio.create_task(loop(kind)) for kind in seen]
    try:
        await until("3 answers each", lambda: min(map(len, seen.values())) >= 3)
        await stop_database(cluster)
        await until("3 503s each", lambda: count(503) >= 3)
        await start_database(cluster)
        marks = {kind: len(statuses) for kind, statuses in seen.items()}
        await until(
            "3 answers each after the start",
            lambda: all(len(seen[k]) >= marks[k] + 3 for k in seen),
        )
    finally:
        for task in loops:
            task.cancel()
        ended = await asyncio.gather(*loops, return_exceptions=True)
    assert all(isinstance(end, asyncio.CancelledError) for end in ended), ended

    for kind, statuses in seen.items():
        assert set(statuses) <= {200, 201, 503}, (kind, statuses)
        assert statuses[-1] in (200, 201), (kind, statuses)  # served again, not restarted
    await until("the watch to see the return", lambda: len(watch_messages(caplog)) >= 2)
    levels = [level for level, _ in watch_messages(caplog)]
    assert levels == [logging.WARNING, logging.INFO]  # one outage: one line each way


async def test_other_failures_stay_a_logged_500(
    aiohttp_client: Client, own_config: config_module.Config, caplog: pytest.LogCaptureFixture
):
    async def disk(_: web.Request) -> web.Response:
        Path("/nonexistent/marid/blob").read_bytes()  # an OSError outside the database
        return web.Response()

    async def slow(_: web.Request) -> web.Response:
        await asyncio.wait_for(asyncio.Event().wait(), 0.01)  # a TimeoutError of our own
        return web.Response()

    app = create_app(own_config)
    app.router.add_get("/disk", disk)
    app.router.add_get("/slow", slow)
    client = await aiohttp_client(app)
    with caplog.at_level(logging.ERROR, logger="marid.api.errors"):
        for path in ("/disk", "/slow"):
            resp = await client.get(path)
            assert resp.status == 500
            assert await resp.json() == {"message": "Internal Server Error"}
    assert "FileNotFoundError" in caplog.text and "TimeoutError" in caplog.text


async def test_only_connection_failures_count_as_an_outage():
    with pytest.raises(OSError) as refused:
        await asyncpg.connect(f"postgresql://nobody:x@127.0.0.1:{free_port()}/none", timeout=30)
    assert errors.database_unavailable(refused.value) == "not reachable"
    assert errors.database_unavailable(asyncpg.CannotConnectNowError("starting up")) == (
        "not accepting connections"
    )
    assert errors.database_unavailable(asyncpg.InterfaceError("connection is closed")) == (
        "connection lost"
    )
    for other in (
        ConnectionRefusedError(111, "refused"),  # not raised inside asyncpg: not the database
        TimeoutError(),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        asyncpg.UniqueViolationError("duplicate key"),
    ):
        assert errors.database_unavailable(other) is None, other


async def test_the_openapi_document_lists_the_503_on_every_operation(client: TestClient):
    doc = await (await client.get("/api/openapi.json")).json()
    shared = doc["components"]["responses"]["Unavailable"]
    assert shared["headers"]["Retry-After"]["schema"] == {"type": "integer"}
    assert shared["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Message"
    }
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            if (method, path) != ("get", "/health"):
                assert operation["responses"]["503"] == {
                    "$ref": "#/components/responses/Unavailable"
                }, (method, path)
    health = doc["paths"]["/health"]["get"]["responses"]["503"]
    assert health["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Health"
    }
    assert "Retry-After" in health["headers"]
