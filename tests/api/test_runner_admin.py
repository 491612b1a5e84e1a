"""Runners and runner tokens for administrators (docs/api.md §28, issue 15): who may, enrolment
tokens shown once and kept as digests, the runner listing, and revoking a registered runner,
which hands its builds back."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid import lifecycle, remote, runners, scopes, tokens
from marid.lifecycle import Claim
from marid.remote import Announcement
from marid.users import User
from tests.api.helpers import BASE, create_namespace
from tests.conftest import MakeToken, MakeUser, base_config, bearer

ENDPOINTS = (
    ("GET", "/api/runners", "runner:read"),
    ("DELETE", "/api/runners/{runner}", "runner:delete"),
    ("GET", "/api/runner-tokens", "runner:read"),
    ("POST", "/api/runner-tokens", "runner:write"),
    ("DELETE", "/api/runner-tokens/{enrolment}", "runner:delete"),
)
ADMIN = "runner:read,write,delete"
EXPIRES_IN = "Expires in must be a number of seconds up to ten years"
MANIFEST = "driver: {type: docker, image: busybox, workspace: /w}\nnamespace: team@alice\n"
SAID = Announcement(
    name="remote-1",
    version="9.9.9",
    hostname="build-7.example.org",
    drivers=["docker"],
    labels=["gpu", "arch=arm64"],
    parallelism=4,
    places=[],
    max_running_per_user=None,
    interval=10.0,
)


@pytest.fixture
def config(db_dsn: str, tmp_path: Path) -> config_module.Config:
    """alice administers (server.admins)."""
    cfg = base_config(db_dsn, tmp_path)
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, admins=["alice"]))


async def enrol(pool: asyncpg.Pool, name: str = "hosts") -> tuple[int, str]:
    async with pool.acquire() as conn:
        enrolment, value = await remote.create_enrolment(conn, name, None, None)
    return enrolment.id, value


async def register(pool: asyncpg.Pool, said: Announcement = SAID) -> tuple[int, str]:
    """A registered runner: its id and runner token."""
    enrolment_id, _ = await enrol(pool, f"for-{said.name}")
    async with pool.acquire() as conn, conn.transaction():
        runner, value = await remote.register(conn, enrolment_id, said, "10.1.2.3", 3)
    return runner.id, value


async def statuses(api: TestClient, pool: asyncpg.Pool, value: str | None) -> list[int]:
    """The status of each endpoint for the token `value` (None: no token)."""
    runner_id, _ = await register(pool)
    enrolment_id, _ = await enrol(pool)
    got = []
    for method, path, _ in ENDPOINTS:
        path = path.format(runner=runner_id, enrolment=enrolment_id)
        headers = bearer(value) if value else {}
        resp = await api.request(method, path, headers=headers, json={"name": "x"})
        got.append(resp.status)
    return got


async def test_anyone_but_an_administrator_gets_404(
    api: TestClient, pool: asyncpg.Pool, token: MakeToken, make_user: MakeUser, alice: User
):
    bob = await make_user("bob")
    every_scope = str(scopes.FULL)
    assert await statuses(api, pool, None) == [404] * 5
    assert await statuses(api, pool, await token(every_scope, user=bob)) == [404] * 5
    # Nothing was revoked or made by them.
    assert await pool.fetchval("SELECT count(*) FROM runners WHERE revoked_at IS NOT NULL") == 0
    assert await pool.fetchval("SELECT count(*) FROM runner_enrolments WHERE name = 'x'") == 0
    assert await statuses(api, pool, await token(every_scope)) == [200, 204, 200, 201, 204]


@pytest.mark.parametrize(("method", "path", "needed"), ENDPOINTS)
async def test_an_administrator_needs_the_endpoints_scope(
    api: TestClient, pool: asyncpg.Pool, alice: User, method: str, path: str, needed: str
):
    lacking = scopes.Scope(scopes.FULL.grants - scopes.parse(needed).grants)
    async with pool.acquire() as conn:
        _, value = await tokens.create(conn, alice, "lacking", lacking)
    runner_id, _ = await register(pool)
    enrolment_id, _ = await enrol(pool)
    path = path.format(runner=runner_id, enrolment=enrolment_id)
    resp = await api.request(method, path, headers=bearer(value), json={"name": "x"})
    assert resp.status == 404
    assert await resp.json() == {"message": "Not Found"}


async def test_a_runner_token_is_shown_once_and_kept_as_a_digest(
    api: TestClient, pool: asyncpg.Pool, token: MakeToken
):
    headers = bearer(await token(ADMIN))
    before = datetime.now(UTC)
    resp = await api.post(
        "/api/runner-tokens", headers=headers, json={"name": "build hosts", "expires_in": 3600}
    )
    assert resp.status == 201
    body = await resp.json()
    value = body.pop("token")
    assert re.fullmatch(r"mre_[A-Za-z0-9_-]{43}", value)
    created_at, expires_at = body.pop("created_at"), body.pop("expires_at")
    assert body == {
        "id": body["id"],
        "name": "build hosts",
        "created_by": "alice",
        "last_used_at": None,
        "url": f"{BASE}/runner-tokens/{body['id']}",
    }
    expires = datetime.fromisoformat(expires_at)
    assert timedelta(0) < expires - datetime.fromisoformat(created_at) <= timedelta(seconds=3600)
    assert before + timedelta(seconds=3590) < expires
    # Only its SHA-256 digest is stored: the value is in no column of the row.
    row = await pool.fetchrow("SELECT * FROM runner_enrolments WHERE id = $1", body["id"])
    assert row["token_digest"] == hashlib.sha256(value.encode()).hexdigest()
    assert all(value not in str(column) for column in row.values())
    # A runner registers with it; the listing never shows the value again.
    async with pool.acquire() as conn:
        assert await remote.enrolment_of(conn, value) == body["id"]
    listed = await (await api.get("/api/runner-tokens", headers=headers)).json()
    assert [(t["id"], t["name"], t["expires_at"]) for t in listed] == [
        (body["id"], "build hosts", expires_at)
    ]
    assert "token" not in listed[0] and listed[0]["last_used_at"] is not None

    never = await api.post("/api/runner-tokens", headers=headers, json={"name": "forever"})
    assert (await never.json())["expires_at"] is None

    resp = await api.delete(f"/api/runner-tokens/{body['id']}", headers=headers)
    assert resp.status == 204
    async with pool.acquire() as conn:
        assert await remote.enrolment_of(conn, value) is None
    again = await api.delete(f"/api/runner-tokens/{body['id']}", headers=headers)
    assert again.status == 404
    listed = await (await api.get("/api/runner-tokens", headers=headers)).json()
    assert [t["name"] for t in listed] == ["forever"]


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, {"name": ["Name field required"]}),
        ({"name": "   "}, {"name": ["Name field required"]}),
        (
            {"name": 5, "expires_in": "1h"},
            {
                "name": ["Name must be a string"],
                "expires_in": ["Expires in must be a number of seconds up to ten years"],
            },
        ),
        ({"name": "x" * 256}, {"name": ["Name cannot be longer than 255 characters in length"]}),
        ({"name": "x", "labels": ["gpu"]}, {"labels": ["Unknown field"]}),
        (
            {"name": "x", "scope": "runner:read", "token": "mre_mine"},
            {"scope": ["Unknown field"], "token": ["Unknown field"]},
        ),
        *(
            ({"name": "x", "expires_in": seconds}, {"expires_in": [EXPIRES_IN]})
            for seconds in (0, -5, True, 10 * 365 * 86400 + 1, [60])
        ),
    ],
)
async def test_bad_bodies_are_field_errors_and_create_nothing(
    api: TestClient, pool: asyncpg.Pool, token: MakeToken, body: dict[str, Any], errors: Any
):
    resp = await api.post("/api/runner-tokens", headers=bearer(await token(ADMIN)), json=body)
    assert resp.status == 400
    assert await resp.json() == errors
    assert await pool.fetchval("SELECT count(*) FROM runner_enrolments") == 0


async def test_runners_lists_in_process_and_registered_runners(
    api: TestClient, pool: asyncpg.Pool, token: MakeToken
):
    async with pool.acquire() as conn:
        await runners.announce(conn, "local-1", ["docker", "os"], 2, hostname="ci-1", pid=42)
    runner_id, _ = await register(pool)
    resp = await api.get("/api/runners", headers=bearer(await token("runner:read")))
    assert resp.status == 200
    listed = await resp.json()
    for runner in listed:
        for key in ("started_at", "last_seen_at"):
            assert runner.pop(key).endswith("Z")
    local_id = listed[0]["id"]
    assert listed == [
        {
            "id": local_id,
            "name": "local-1",
            "remote": False,
            "version": listed[0]["version"],
            "hostname": "ci-1",
            "drivers": ["docker", "os"],
            "labels": [],
            "capacity": 2,
            "running": 0,
            "alive": True,
            "revoked_at": None,
            "address": None,
            "url": f"{BASE}/runners/{local_id}",
        },
        {
            "id": runner_id,
            "name": "remote-1",
            "remote": True,
            "version": "9.9.9",
            "hostname": "build-7.example.org",
            "drivers": ["docker"],
            "labels": ["gpu", "arch=arm64"],
            "capacity": 4,
            "running": 0,
            "alive": True,
            "revoked_at": None,
            "address": "10.1.2.3",
            "url": f"{BASE}/runners/{runner_id}",
        },
    ]


async def submitted(api: TestClient, headers: dict[str, str]) -> int:
    resp = await api.post("/api/builds", headers=headers, json={"manifest": MANIFEST})
    assert resp.status == 201, await resp.text()
    return int((await resp.json())["id"])


async def test_revoking_a_registered_runner_hands_its_builds_back(
    api: TestClient, pool: asyncpg.Pool, token: MakeToken
):
    headers = bearer(await token(f"{ADMIN} build:read,write namespace:write webhook:write"))
    await create_namespace(api, headers["Authorization"].split()[1], "team")
    hook = await api.post(
        "/api/n/alice/team/-/webhooks",
        headers=headers,
        json={"payload_url": "https://hooks.example.org/ci", "events": ["build.finished"]},
    )
    assert hook.status == 201, await hook.text()
    runner_id, value = await register(pool)
    requeued, killed = await submitted(api, headers), await submitted(api, headers)
    async with pool.acquire() as conn:
        for _ in range(2):
            assert await remote_claim(conn) is not None
        await conn.execute("UPDATE builds SET kill_requested = true WHERE id = $1", killed)
    listed = await (await api.get("/api/runners", headers=headers)).json()
    assert [(r["name"], r["running"]) for r in listed] == [("remote-1", 2)]

    resp = await api.delete(f"/api/runners/{runner_id}", headers=headers)
    assert resp.status == 204
    rows = await pool.fetch(
        "SELECT id, status, attempt, runner, retry_reason FROM builds ORDER BY id"
    )
    assert [tuple(row) for row in rows] == [
        (requeued, "queued", 1, None, "attempt 1: runner revoked"),
        (killed, "killed", 1, "remote-1", None),
    ]
    # The build that ended sends build.finished; the one handed back for a new attempt not.
    deliveries = await pool.fetch("SELECT event, body FROM webhook_deliveries")
    assert [row["event"] for row in deliveries] == ["build.finished"]
    assert f'"id":{killed},' in deliveries[0]["body"].decode()
    async with pool.acquire() as conn:
        found = await remote.runner_of(conn, value)
        assert found is not None and found.revoked
        assert not await conn.fetchval(
            "SELECT runner_alive(r) FROM runners r WHERE id = $1", runner_id
        )
    listed = await (await api.get("/api/runners", headers=headers)).json()
    assert listed[0]["alive"] is False and listed[0]["revoked_at"].endswith("Z")
    assert listed[0]["running"] == 0
    # Revoking again changes nothing.
    assert (await api.delete(f"/api/runners/{runner_id}", headers=headers)).status == 204
    assert await pool.fetchval("SELECT count(*) FROM webhook_deliveries") == 1


async def remote_claim(conn: asyncpg.Connection) -> Claim | None:
    """A claim made as the registered runner `remote-1` would (lifecycle.claim by name)."""
    return await lifecycle.claim(conn, SAID.name, ["docker"], 30.0)


async def test_an_in_process_runner_cannot_be_revoked(
    api: TestClient, pool: asyncpg.Pool, token: MakeToken
):
    async with pool.acquire() as conn:
        await runners.announce(conn, "local-1", ["docker"], 2)
    local_id = await pool.fetchval("SELECT id FROM runners WHERE name = 'local-1'")
    headers = bearer(await token(ADMIN))
    for runner_id in (local_id, local_id + 1000):
        resp = await api.delete(f"/api/runners/{runner_id}", headers=headers)
        assert resp.status == 404
        assert await resp.json() == {"message": "Not Found"}
    assert await pool.fetchval("SELECT revoked_at FROM runners WHERE id = $1", local_id) is None
