"""Concurrency limits and why a queued build waits (issue 14 items 2 and 3, docs/api.md §7.1
Pending, §8.1 `max_running`): a namespace's `max_running` and the runners' per-author limit
hold builds back at the claim, whatever number of runners claim at once, and each held build
says which limit holds it, an image still downloading, a retry time, or its place in the queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import images, lifecycle, namespaces, runners
from marid.api.app import create_app
from marid.config import Config
from marid.users import User
from tests.api.helpers import create_namespace
from tests.conftest import MakeToken, MakeUser, bearer

SCOPE = "build:read,write,delete namespace:read,write"
DOCKER = "driver: {type: docker, image: busybox, workspace: /w}\n"
LEASE = 30.0


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], config: Config, pool: asyncpg.Pool
) -> TestClient:
    return await aiohttp_client(create_app(config, pool))


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as connection:
        yield connection


class Api:
    def __init__(self, client: TestClient, token: str, username: str = "alice") -> None:
        self.client, self.token, self.username = client, token, username

    async def submit(self, manifest: str = DOCKER, namespace: str | None = None) -> int:
        if namespace is not None:
            manifest = f"namespace: {namespace}\n{manifest}"
        resp = await self.client.post(
            "/api/builds", headers=bearer(self.token), json={"manifest": manifest}
        )
        assert resp.status == 201, await resp.text()
        return int((await resp.json())["number"])

    async def get(self, path: str) -> Any:
        resp = await self.client.get(f"/api{path}", headers=bearer(self.token))
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def pending(self, number: int) -> Any:
        """`pending` of the build `number`, checked against the queued listing's."""
        build = await self.get(f"/b/{self.username}/{number}")
        listed = {b["number"]: b for b in await self.get("/builds?status=queued")}
        assert listed[number]["pending"] == build["pending"]
        return build["pending"]

    async def patch(self, path: str, body: dict[str, Any]) -> Any:
        return await self.client.patch(f"/api{path}", headers=bearer(self.token), json=body)


@pytest.fixture
async def api(client: TestClient, token: MakeToken) -> Api:
    return Api(client, await token(SCOPE))


async def claim(conn: asyncpg.Connection, author_limit: int | None = None) -> int | None:
    """Claim one docker build as a runner would; the claimed build's id."""
    async with conn.transaction():
        claimed = await lifecycle.claim(conn, "runner-1", ["docker"], LEASE, author_limit)
    return claimed.build_id if claimed else None


async def build_id(conn: asyncpg.Connection, number: int, username: str = "alice") -> int:
    return int(
        await conn.fetchval(
            "SELECT b.id FROM builds b JOIN users u ON u.id = b.user_id"
            " WHERE u.username = $1 AND b.number = $2",
            username,
            number,
        )
    )


# -- max_running on the Namespace entity ---------------------------------------------------------


async def test_a_namespace_is_created_and_changed_with_a_limit_and_shows_it(api: Api):
    created = await create_namespace(api.client, api.token, "team", max_running=2)
    assert created["max_running"] == 2
    resp = await api.patch("/n/alice/team", {"max_running": 5})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["max_running"] == 5
    resp = await api.patch("/n/alice/team", {"description": "no change to the limit"})
    assert (await resp.json())["max_running"] == 5
    resp = await api.patch("/n/alice/team", {"max_running": None})  # null: no limit
    assert (await resp.json())["max_running"] is None
    assert (await api.get("/n/alice/team"))["max_running"] is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "Max running must be between 1 and 10000"),
        (10001, "Max running must be between 1 and 10000"),
        (-1, "Max running must be between 1 and 10000"),
        ("2", "Max running must be an integer or null"),
        (True, "Max running must be an integer or null"),
        (1.5, "Max running must be an integer or null"),
        ([2], "Max running must be an integer or null"),
    ],
)
async def test_a_bad_limit_is_a_field_keyed_400_on_create_and_on_patch(
    api: Api, value: Any, message: str
):
    resp = await api.client.post(
        "/api/namespaces", headers=bearer(api.token), json={"name": "team", "max_running": value}
    )
    assert resp.status == 400
    assert await resp.json() == {"max_running": [message]}
    await create_namespace(api.client, api.token, "team", max_running=3)
    resp = await api.patch("/n/alice/team", {"max_running": value})
    assert resp.status == 400
    assert await resp.json() == {"max_running": [message]}
    assert (await api.get("/n/alice/team"))["max_running"] == 3  # nothing half-applied


# -- Held builds and their reasons ---------------------------------------------------------------


async def test_a_namespace_at_its_limit_holds_its_next_build_and_says_so(
    api: Api, conn: asyncpg.Connection
):
    await runners.announce(conn, "runner-1", ["docker"], 4)
    await create_namespace(api.client, api.token, "team", max_running=1)
    first = await api.submit(namespace="team")
    second = await api.submit(namespace="team")
    elsewhere = await api.submit()  # no namespace: no namespace limit
    assert await claim(conn) == await build_id(conn, first)
    assert await api.pending(second) == {
        "reason": "namespace limit of 1 running builds reached",
        "position": 1,  # first of the queue once released: the later build is not ahead
    }
    # The runner skips the held build for the later one it may take.
    assert await claim(conn) == await build_id(conn, elsewhere)
    assert await claim(conn) is None

    # Raising the limit releases it.
    resp = await api.patch("/n/alice/team", {"max_running": 2})
    assert resp.status == 200
    assert await api.pending(second) == {
        "reason": "waiting for a runner slot (0 ahead)",
        "position": 1,
    }
    assert await claim(conn) == await build_id(conn, second)


async def test_a_running_build_that_ends_frees_its_namespaces_slot(
    api: Api, conn: asyncpg.Connection
):
    await runners.announce(conn, "runner-1", ["docker"], 4)
    await create_namespace(api.client, api.token, "team", max_running=1)
    first, second = await api.submit(namespace="team"), await api.submit(namespace="team")
    running = await claim(conn)
    assert running == await build_id(conn, first)
    assert await claim(conn) is None
    async with conn.transaction():
        await lifecycle.build_finished(conn, lifecycle.Claim(running, 1), "passed")
    assert await claim(conn) == await build_id(conn, second)


async def test_the_runners_author_limit_holds_an_authors_builds_not_anothers(
    client: TestClient, token: MakeToken, make_user: MakeUser, alice: User,
    conn: asyncpg.Connection,
):  # fmt: skip
    alice_api = Api(client, await token(SCOPE))
    bob = await make_user("bob")
    bob_api = Api(client, await token(SCOPE, user=bob), "bob")
    await runners.announce(conn, "runner-1", ["docker"], 4, author_limit=1)
    alice_first, alice_second = await alice_api.submit(), await alice_api.submit()
    bobs = await bob_api.submit()
    assert await claim(conn, author_limit=1) == await build_id(conn, alice_first)
    assert await alice_api.pending(alice_second) == {
        "reason": "user limit of 1 running builds reached",
        "position": 1,
    }
    assert await claim(conn, author_limit=1) == await build_id(conn, bobs, "bob")
    assert await claim(conn, author_limit=1) is None
    # A runner without the limit would take it: the reason says what some runner would do.
    await runners.announce(conn, "runner-2", ["docker"], 4)
    assert (await alice_api.pending(alice_second))["reason"] == (
        "waiting for a runner slot (0 ahead)"
    )
    assert await claim(conn) == await build_id(conn, alice_second)


async def test_a_build_whose_image_is_still_downloading_waits_for_it(
    api: Api, alice: User, conn: asyncpg.Connection
):
    await runners.announce(conn, "runner-1", ["docker"], 4)
    async with conn.transaction():
        image_id = await images.create(conn, alice, None, "docker", "busybox", None)
        await images.add_download(conn, image_id, "https://example.invalid/b.tar", b"sealed")
    number = await api.submit()
    assert await api.pending(number) == {"reason": "image being loaded: busybox", "position": 1}
    assert await claim(conn) is None
    # A build naming another image is not held behind it.
    other = await api.submit("driver: {type: docker, image: alpine, workspace: /w}\n")
    assert await claim(conn) == await build_id(conn, other)

    async with conn.transaction():  # the download fails: the build runs, and says why
        await images.finish_download(conn, image_id, None, "refused by policy")
    assert await claim(conn) == await build_id(conn, number)


async def test_a_build_waiting_to_retry_says_from_when(api: Api, conn: asyncpg.Connection):
    await runners.announce(conn, "runner-1", ["docker"], 4)
    number = await api.submit()
    await conn.execute(
        "UPDATE builds SET retry_at = '2999-01-02T03:04:05Z' WHERE id = $1",
        await build_id(conn, number),
    )
    assert await api.pending(number) == {
        "reason": "waiting to retry after a failed attempt, from 2999-01-02T03:04:05Z",
        "position": 1,
    }


async def test_each_queued_build_knows_its_place_among_the_builds_of_its_driver(
    api: Api, conn: asyncpg.Connection
):
    await runners.announce(conn, "runner-1", ["docker", "os"], 1)
    await create_namespace(api.client, api.token, "team", max_running=1)
    numbers = [await api.submit() for _ in range(3)]
    held = [await api.submit(namespace="team") for _ in range(2)]
    last = await api.submit()
    assert [(await api.pending(n))["reason"] for n in numbers] == [
        "waiting for a runner slot (0 ahead)",
        "waiting for a runner slot (1 ahead)",
        "waiting for a runner slot (2 ahead)",
    ]
    # The namespace's first build is not held while none of its builds runs; its second
    # is not held either until one runs. Held builds do not count as ahead of others.
    assert [(await api.pending(n))["position"] for n in [*held, last]] == [4, 5, 6]
    await claim(conn)
    await claim(conn)
    await claim(conn)
    await claim(conn)  # the namespace's first
    assert await api.pending(held[1]) == {
        "reason": "namespace limit of 1 running builds reached",
        "position": 1,
    }
    assert await api.pending(last) == {
        "reason": "waiting for a runner slot (0 ahead)",
        "position": 1,
    }


# -- Enforced by the database, whatever the number of claimers -----------------------------------


@pytest.mark.parametrize("author_limit", [None, 3])
async def test_many_claimers_at_once_never_run_more_than_a_namespaces_limit(
    api: Api, pool: asyncpg.Pool, conn: asyncpg.Connection, author_limit: int | None
):
    """20 connections claim at once, again and again, from 3 namespaces limited to 2 builds
    each: at most 2 of each run at any time, and every build is claimed in the end."""
    await runners.announce(conn, "runner-1", ["docker"], 20)
    limits = {"one": 2, "two": 2, "three": 1}
    for name, limit in limits.items():
        await create_namespace(api.client, api.token, name, max_running=limit)
        for _ in range(6):
            await api.submit(namespace=name)
    ns_ids = {name: (await namespaces.get_by_path(conn, "alice", name)).id for name in limits}  # type: ignore[union-attr]
    worst: dict[str, int] = dict.fromkeys(limits, 0)
    worst_author = 0
    claimed_total = 0

    async def claimer() -> int:
        async with pool.acquire() as own:
            return await claim(own, author_limit) or 0

    while claimed_total < 18:
        got = [c for c in await asyncio.gather(*(claimer() for _ in range(20))) if c]
        claimed_total += len(got)
        running = await conn.fetch(
            "SELECT namespace_id, count(*) FROM builds WHERE status = 'running'"
            " GROUP BY namespace_id"
        )
        counts = {row["namespace_id"]: row["count"] for row in running}
        for name, ns_id in ns_ids.items():
            worst[name] = max(worst[name], counts.get(ns_id, 0))
        worst_author = max(worst_author, sum(counts.values()))
        assert got or claimed_total == 18, "nothing claimable while builds wait"
        # End one running build of each namespace, as their runners would.
        for row in await conn.fetch(
            "SELECT DISTINCT ON (namespace_id) id, attempt FROM builds WHERE status = 'running'"
            " ORDER BY namespace_id, id"
        ):
            async with conn.transaction():
                await lifecycle.build_finished(
                    conn, lifecycle.Claim(row["id"], row["attempt"]), "passed"
                )
    if author_limit is None:
        assert worst == limits
    else:
        assert all(worst[name] <= limits[name] for name in limits), worst
        assert worst_author == author_limit
