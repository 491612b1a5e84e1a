"""Builds over HTTP (docs/api.md §7, docs/api.md §22), without a runner: submission, listing,
tags, pins, kills of queued builds and idempotency."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid.api.app import create_app
from marid.config import Config
from marid.users import User
from tests.api.helpers import BASE, user_json
from tests.conftest import MakeToken, MakeUser, bearer

SCOPE = "build:read,write,delete namespace:read,write"
DOCKER = "driver:\n  type: docker\n  image: alpine\n  workspace: /w\n"


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], config: Config, pool: asyncpg.Pool
) -> TestClient:
    return await aiohttp_client(
        create_app(dataclasses.replace(config, drivers=["docker", "os"]), pool)
    )


async def submit(client: TestClient, token: str, manifest: str = DOCKER, **extra: Any) -> Any:
    resp = await client.post(
        "/api/builds", headers=bearer(token), json={"manifest": manifest, **extra}
    )
    return resp.status, await resp.json()


async def test_submission_returns_the_whole_build(
    client: TestClient, alice: User, token: MakeToken
):
    status, body = await submit(
        client, await token(SCOPE), comment="nightly", tags=["go", "ci", "bad tag", "go"]
    )
    assert status == 201
    url = f"{BASE}/b/alice/1"
    assert body == {
        "id": body["id"],
        "user_id": alice.id,
        "namespace_id": None,
        "number": 1,
        "manifest": DOCKER,
        "status": "queued",
        "output": None,
        "tags": ["ci", "go"],
        "pinned": False,
        "attempts": 0,
        "pending": {"reason": "no runner is running", "position": 1},  # tests/api/test_pending.py
        "restarted_from": None,  # tests/api/test_restart.py
        "created_at": body["created_at"],
        "started_at": None,
        "finished_at": None,
        "url": url,
        **{f"{k}_url": f"{url}/{k}" for k in ("objects", "variables", "jobs", "artifacts", "tags")},
        "user": user_json(alice),
        "namespace": None,
        "trigger": {
            "type": "manual",
            "comment": "nightly",
            "data": {"email": "alice@example.com", "username": "alice"},
        },
    }


async def test_numbers_count_per_owner_even_concurrently(
    client: TestClient, make_user: MakeUser, token: MakeToken
):
    value = await token(SCOPE)
    results = await asyncio.gather(*(submit(client, value) for _ in range(10)))
    assert sorted(body["number"] for _, body in results) == list(range(1, 11))
    bob = await make_user("bob")
    _, first = await submit(client, await token(SCOPE, user=bob))
    assert first["number"] == 1


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, {"manifest": ["Manifest field required"]}),
        ({"manifest": ""}, {"manifest": ["Manifest field required"]}),
        ({"manifest": 5}, {"manifest": ["Manifest must be a string"]}),
        (
            {"manifest": DOCKER, "comment": 1, "tags": "x"},
            {"comment": ["Comment must be a string"], "tags": ["Tags must be an array of strings"]},
        ),
        (
            {"manifest": "driver: {type: qemu, image: x}"},
            {"manifest": ["Manifest driver error: qemu-x86_64 - driver disabled"]},
        ),
        (
            {"manifest": "driver: {type: docker}"},
            {
                "manifest": [
                    "Manifest driver docker requires image",
                    "Manifest driver docker requires workspace",
                ]
            },
        ),
        ({"manifest": "[1"}, None),
        (
            {"manifest": DOCKER + "namespace: a b\n"},
            {"manifest": ["Manifest namespace name can only contain letters and numbers"]},
        ),
        (
            {"manifest": DOCKER + "namespace: x@bob\n"},
            {"manifest": ["Manifest cannot submit to namespace"]},
        ),
    ],
)
async def test_submission_validation(
    client: TestClient, token: MakeToken, pool: asyncpg.Pool, body: dict, errors: dict | None
):
    resp = await client.post("/api/builds", headers=bearer(await token(SCOPE)), json=body)
    assert resp.status == 400
    got = await resp.json()
    if errors is None:
        assert list(got) == ["manifest"] and got["manifest"][0].startswith(
            "Manifest is not valid YAML: "
        )
    else:
        assert got == errors
    assert await pool.fetchval("SELECT count(*) FROM builds") == 0
    assert await pool.fetchval("SELECT count(*) FROM namespaces") == 0


async def test_namespace_is_created_and_owns_the_build(client: TestClient, token: MakeToken):
    value = await token(SCOPE)
    status, body = await submit(client, value, DOCKER + "namespace: acme/web\n")
    assert status == 201
    assert body["namespace"]["path"] == "acme/web" and body["namespace"]["visibility"] == "private"
    listed = await (
        await client.get("/api/n/alice/acme/web/-/builds", headers=bearer(value))
    ).json()
    assert [b["id"] for b in listed] == [body["id"]]
    ns = await (await client.get("/api/n/alice/acme/web", headers=bearer(value))).json()
    assert ns["build"]["id"] == body["id"] and ns["build"]["namespace"] is None


async def test_collaborator_builds_belong_to_the_namespace_owner(
    client: TestClient, alice: User, make_user: MakeUser, token: MakeToken, pool: asyncpg.Pool
):
    bob = await make_user("bob")
    owner = await token(SCOPE)
    await submit(client, owner, DOCKER + "namespace: team\n")
    root = await pool.fetchval("SELECT id FROM namespaces WHERE path = 'team'")
    await pool.execute("INSERT INTO namespace_collaborators VALUES ($1, $2)", root, bob.id)
    status, body = await submit(
        client, await token(SCOPE, user=bob), DOCKER + "namespace: team@alice\n"
    )
    assert status == 201
    assert (body["user_id"], body["number"]) == (alice.id, 2)
    assert body["trigger"]["data"] == {"email": "bob@example.com", "username": "bob"}


async def test_filters_and_pagination(client: TestClient, token: MakeToken, pool: asyncpg.Pool):
    value = await token(SCOPE)
    for n in range(28):
        await submit(client, value, tags=[f"t{n % 3}", "all"])
    await pool.execute("UPDATE builds SET status = 'passed_with_failures' WHERE number <= 2")
    await pool.execute("UPDATE builds SET pinned = true WHERE number = 5")

    async def numbers(query: str) -> list[int]:
        resp = await client.get(f"/api/builds{query}", headers=bearer(value))
        return [b["number"] for b in await resp.json()]

    assert await numbers("") == list(range(28, 3, -1))
    assert await numbers("?page=2") == [3, 2, 1]
    assert await numbers("?status=passed") == [2, 1]
    assert await numbers("?status=passed_with_failures") == [2, 1]
    assert await numbers("?status=nonsense") == []
    assert await numbers("?pinned=true") == [5]
    assert await numbers("?pinned=0&tag=t0&page=2") == list(range(28, 0, -3))  # page clamps
    assert (await numbers("?search=T1&page=1"))[:2] == [26, 23]
    resp = await client.get("/api/builds?tag=t0", headers=bearer(value))
    assert resp.headers["Link"].startswith(f"<{BASE}/builds?page=1&tag=t0>")


async def test_tags_pin_and_kill(
    client: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool
):
    value = await token(SCOPE)
    await submit(client, value, tags=["first"])
    base = "/api/b/alice/1"
    resp = await client.post(
        base + "/tags", headers=bearer(value), json=["b/2", "first", "a", "bad tag", "a"]
    )
    assert resp.status == 201
    added = await resp.json()
    assert [t["name"] for t in added] == ["a", "b/2"]
    assert added[0]["url"] == f"{BASE}/b/alice/1/tags/a" and added[0]["user"] == user_json(alice)
    assert added[0]["build"]["tags"] == ["a", "b/2", "first"]
    resp = await client.post(base + "/tags", headers=bearer(value), json={"x": 1})
    assert (resp.status, await resp.json()) == (
        400,
        {"message": "Body must be a JSON array of strings"},
    )
    shown = await client.get(base + "/tags/b/2", headers=bearer(value))
    assert (await shown.json())["name"] == "b/2"
    assert (await client.delete(base + "/tags/b/2", headers=bearer(value))).status == 204
    assert (await client.delete(base + "/tags/b/2", headers=bearer(value))).status == 404
    tags = await (await client.get(base + "/tags", headers=bearer(value))).json()
    assert [t["name"] for t in tags] == ["a", "first"]

    assert (await (await client.patch(base + "/pin", headers=bearer(value))).json())[
        "pinned"
    ] is True
    assert (await (await client.patch(base + "/pin", headers=bearer(value))).json())[
        "pinned"
    ] is True
    assert (await (await client.patch(base + "/unpin", headers=bearer(value))).json())[
        "pinned"
    ] is False

    assert (await client.delete(base, headers=bearer(value))).status == 204
    killed = await (await client.get(base, headers=bearer(value))).json()
    assert (killed["status"], killed["started_at"]) == ("killed", None)
    assert killed["finished_at"] is not None
    assert (await client.delete(base, headers=bearer(value))).status == 204  # no change


async def test_jobs_of_a_queued_build(client: TestClient, token: MakeToken):
    value = await token(SCOPE)
    manifest = DOCKER + (
        "sources:\n- https://example.invalid/app.git v1 => src\nstages: [test]\n"
        "jobs:\n- stage: test\n  name: Unit Tests\n  commands: [make, make test]\n"
    )
    await submit(client, value, manifest)
    jobs = await (await client.get("/api/b/alice/1/jobs", headers=bearer(value))).json()
    assert [(j["stage"], j["name"], j["commands"], j["status"]) for j in jobs] == [
        ("setup - #1", "create-driver", "", "queued"),
        (
            "setup - #1",
            "clone.0",
            "mkdir -p src\ngit clone -q https://example.invalid/app.git src\n"
            "cd src\ngit checkout -q v1",
            "queued",
        ),
        ("test", "unit-tests", "make\nmake test", "queued"),
    ]
    job = await (await client.get("/api/b/alice/1/jobs/unit-tests", headers=bearer(value))).json()
    assert job["url"] == f"{BASE}/b/alice/1/jobs/unit-tests" and job["output"] is None
    assert (await client.get("/api/b/alice/1/jobs/nope", headers=bearer(value))).status == 404
    filtered = await (
        await client.get("/api/b/alice/1/jobs?name=UNIT", headers=bearer(value))
    ).json()
    assert [j["name"] for j in filtered] == ["unit-tests"]
    output = await client.get("/api/b/alice/1/jobs/unit-tests/output", headers=bearer(value))
    assert await output.text() == "" and output.headers["X-Marid-Job-Status"] == "queued"


async def test_idempotency_key(client: TestClient, token: MakeToken, pool: asyncpg.Pool):
    value = await token(SCOPE)
    headers = {**bearer(value), "Idempotency-Key": "abc-123"}
    first = await client.post("/api/builds", headers=headers, json={"manifest": DOCKER})
    again = await client.post("/api/builds", headers=headers, json={"manifest": DOCKER})
    assert (first.status, again.status) == (201, 201)
    assert await first.read() == await again.read()
    assert (
        again.headers["Idempotent-Replayed"] == "true"
        and "Idempotent-Replayed" not in first.headers
    )
    assert await pool.fetchval("SELECT count(*) FROM builds") == 1
    other = await client.post(
        "/api/builds", headers=headers, json={"manifest": DOCKER, "comment": "x"}
    )
    assert (other.status, await other.json()) == (
        422,
        {"message": "Idempotency-Key was used with a different request"},
    )
    bad = await client.post(
        "/api/builds", headers={**bearer(value), "Idempotency-Key": "a b"}, json={}
    )
    assert await bad.json() == {
        "idempotency_key": ["Idempotency-Key must be 1 to 255 visible ASCII characters"]
    }
    # A failed request is not stored: retrying it is processed afresh.
    retry = {**bearer(value), "Idempotency-Key": "k2"}
    assert (await client.post("/api/builds", headers=retry, json={})).status == 400
    assert (
        await client.post("/api/builds", headers=retry, json={"manifest": DOCKER})
    ).status == 201


async def test_concurrent_idempotent_request_is_409(
    client: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool
):
    value = await token(SCOPE)
    await pool.execute(
        "INSERT INTO idempotency_keys (user_id, key, request_sha256) VALUES ($1, 'busy', 'x')",
        alice.id,
    )
    resp = await client.post(
        "/api/builds",
        headers={**bearer(value), "Idempotency-Key": "busy"},
        json={"manifest": DOCKER},
    )
    assert (resp.status, await resp.json()) == (
        409,
        {"message": "A request with this Idempotency-Key is in progress"},
    )


async def test_public_builds_are_readable_anonymously(
    client: TestClient, make_user: MakeUser, token: MakeToken
):
    value = await token(SCOPE)
    await client.post(
        "/api/namespaces", headers=bearer(value), json={"name": "open", "visibility": "public"}
    )
    await submit(client, value, DOCKER + "namespace: open\n")
    await submit(client, value)
    assert (await client.get("/api/b/alice/1")).status == 200
    assert (await client.get("/api/b/alice/1/jobs")).status == 200
    assert (await client.get("/api/b/alice/2")).status == 404
    bob = await make_user("bob")
    assert (
        await client.get("/api/b/alice/2", headers=bearer(await token(SCOPE, user=bob)))
    ).status == 404
    assert (
        await client.delete("/api/b/alice/1", headers=bearer(await token(SCOPE, user=bob)))
    ).status == 404
    badge = await (await client.get("/api/n/alice/open/-/badge.svg")).text()
    assert "<title>marid: queued</title>" in badge
