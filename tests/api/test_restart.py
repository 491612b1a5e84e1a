"""Restarting a build (issue 14 item 1, docs/api.md §27): POST /b/:username/:number/restart
makes a new queued build of the same owner and namespace from the original's stored plan and
snapshot, tagged `restart` and linked to the original, for whoever may use the build."""

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
from tests.api.helpers import BASE, add_collaborator, create_namespace
from tests.conftest import MakeToken, MakeUser, bearer

SCOPE = "build:read,write,delete namespace:read,write variable:read,write,delete invite:read,write"
MANIFEST = """\
driver: {type: docker, image: busybox, workspace: /w}
stages: [build, test]
jobs:
- stage: build
  commands: [make]
  artifacts: [out.bin]
- stage: test
  name: unit
  commands: [make test]
"""


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], config: Config, pool: asyncpg.Pool
) -> TestClient:
    return await aiohttp_client(create_app(config, pool))


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as connection:
        yield connection


async def call(client: TestClient, token: str, method: str, path: str, **kwargs: Any) -> Any:
    resp = await client.request(method, f"/api{path}", headers=bearer(token), **kwargs)
    body = await resp.json() if resp.content_type == "application/json" else None
    return resp.status, body


async def submit(client: TestClient, token: str, manifest: str = MANIFEST) -> dict[str, Any]:
    status, body = await call(client, token, "POST", "/builds", json={"manifest": manifest})
    assert status == 201, body
    return dict(body)


async def finish(conn: asyncpg.Connection, build: dict[str, Any], status: str) -> None:
    """Run the build's attempt to `status` as a runner would (nothing executes)."""
    async with conn.transaction():
        claim = await lifecycle.claim(conn, "runner-1", ["docker"], 30.0)
        assert claim is not None and claim.build_id == build["id"]
        await lifecycle.build_finished(conn, claim, status)


async def test_a_failed_build_restarts_as_a_new_build_from_the_same_snapshot(
    client: TestClient, token: MakeToken, conn: asyncpg.Connection
):
    alice = await token(SCOPE)
    status, variable = await call(
        client, alice, "POST", "/variables", json={"key": "MODE", "value": "first"}
    )
    assert status == 201
    original = await submit(client, alice)
    await finish(conn, original, "failed")
    # Changed after the submission: the restart still has what the original froze.
    await call(client, alice, "DELETE", f"/variables/{variable['id']}")
    await call(client, alice, "POST", "/variables", json={"key": "MODE", "value": "second"})

    status, made = await call(client, alice, "POST", "/b/alice/1/restart")
    assert status == 201, made
    assert made["number"] == 2
    assert made["status"] == "queued"
    assert made["manifest"] == original["manifest"]
    assert made["tags"] == ["restart"]
    assert made["restarted_from"] == f"{BASE}/b/alice/1"
    assert made["trigger"] == {
        "type": "manual",
        "comment": "Restart of #1",
        "data": {"email": "alice@example.com", "username": "alice"},
    }
    assert made["pending"] is not None
    assert original["restarted_from"] is None
    _, jobs = await call(client, alice, "GET", "/b/alice/2/jobs")
    assert [(j["stage"], j["name"], j["status"]) for j in jobs] == [
        ("setup - #2", "create-driver", "queued"),
        ("build", "build.1", "queued"),
        ("test", "unit", "queued"),
    ]
    _, variables = await call(client, alice, "GET", "/b/alice/2/variables")
    assert [(v["key"], v["value"]) for v in variables] == [("MODE", "first")]
    _, declared = await call(client, alice, "GET", "/b/alice/1/artifacts")
    _, artifacts = await call(client, alice, "GET", "/b/alice/2/artifacts")
    assert [(a["name"], a["build_id"]) for a in artifacts] == [
        (a["name"], made["id"]) for a in declared
    ]
    # The restart runs like any build.
    await finish(conn, made, "passed")
    _, done = await call(client, alice, "GET", "/b/alice/2")
    assert done["status"] == "passed"


@pytest.mark.parametrize("status", ["passed", "killed", "timed_out", "passed_with_failures"])
async def test_any_finished_build_can_be_restarted(
    client: TestClient, token: MakeToken, conn: asyncpg.Connection, status: str
):
    alice = await token(SCOPE)
    await finish(conn, await submit(client, alice), status)
    code, made = await call(client, alice, "POST", "/b/alice/1/restart", json={})
    assert code == 201, made
    assert made["restarted_from"].endswith("/b/alice/1")


async def test_a_queued_or_running_build_cannot_be_restarted(
    client: TestClient, token: MakeToken, conn: asyncpg.Connection
):
    alice = await token(SCOPE)
    await submit(client, alice)
    assert await call(client, alice, "POST", "/b/alice/1/restart") == (
        400,
        {"message": "Build #1 is queued: only a finished build can be restarted"},
    )
    async with conn.transaction():
        await lifecycle.claim(conn, "runner-1", ["docker"], 30.0)
    assert await call(client, alice, "POST", "/b/alice/1/restart") == (
        400,
        {"message": "Build #1 is running: only a finished build can be restarted"},
    )
    _, listed = await call(client, alice, "GET", "/builds")
    assert len(listed) == 1  # nothing half-made


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({"from": 3}, {"from": ["From must be a string"]}),
        ({"from": ""}, {"from": ["From cannot be empty: name a job, or leave it out"]}),
        ({"from": "nope"}, {"from": ["Build #1 has no job named nope"]}),
        (
            {"from": "create-driver"},
            {"from": ["create-driver is a setup job: restart without from"]},
        ),
    ],
)
async def test_a_bad_body_is_a_field_keyed_400(
    client: TestClient, token: MakeToken, conn: asyncpg.Connection, body: Any, errors: Any
):
    alice = await token(SCOPE)
    await finish(conn, await submit(client, alice), "failed")
    assert await call(client, alice, "POST", "/b/alice/1/restart", json=body) == (400, errors)
    status, text = await call(client, alice, "POST", "/b/alice/1/restart", data=b"{nope")
    assert (status, text) == (400, {"message": "Malformed JSON body"})
    _, listed = await call(client, alice, "GET", "/builds")
    assert len(listed) == 1


async def test_who_may_restart_a_namespaces_build(
    client: TestClient, token: MakeToken, make_user: MakeUser, alice: Any,
    conn: asyncpg.Connection,
):  # fmt: skip
    owner = await token(SCOPE)
    await create_namespace(client, owner, "team", visibility="public")
    original = await submit(client, owner, "namespace: team\n" + MANIFEST)
    await finish(conn, original, "failed")
    bob, carol = await make_user("bob"), await make_user("carol")
    bob_token, carol_token = await token(SCOPE, user=bob), await token(SCOPE, user=carol)
    await add_collaborator(client, owner, "team", "alice", bob_token, "bob")

    # carol can read the public build but not use it; a token without build:write neither.
    assert (await call(client, carol_token, "GET", "/b/alice/1"))[0] == 200
    assert (await call(client, carol_token, "POST", "/b/alice/1/restart"))[0] == 404
    reader = await token("build:read", user=bob)
    assert (await call(client, reader, "POST", "/b/alice/1/restart"))[0] == 404

    status, made = await call(client, bob_token, "POST", "/b/alice/1/restart")
    assert status == 201, made
    assert made["user"]["username"] == "alice"  # the owner's build, numbered for her
    assert made["namespace"]["path"] == "team"
    assert made["trigger"]["data"]["username"] == "bob"


async def test_a_restart_needs_the_driver_open_to_whoever_restarts_it(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    config: Config,
    pool: asyncpg.Pool,
    token: MakeToken,
    make_user: MakeUser,
    alice: Any,
    conn: asyncpg.Connection,
):
    """alice may run `os` builds; bob, her collaborator, may not: he cannot restart hers."""
    os_config = dataclasses.replace(
        config,
        drivers=["docker", "os"],
        os_driver=dataclasses.replace(config.os_driver, users=["alice"]),
    )
    client = await aiohttp_client(create_app(os_config, pool))
    owner = await token(SCOPE)
    await create_namespace(client, owner, "team")
    await submit(client, owner, "namespace: team\ndriver: {type: os}\n")
    async with conn.transaction():
        claim = await lifecycle.claim(conn, "runner-1", ["os"], 30.0)
        assert claim is not None
        await lifecycle.build_finished(conn, claim, "failed")
    bob = await make_user("bob")
    bob_token = await token(SCOPE, user=bob)
    await add_collaborator(client, owner, "team", "alice", bob_token, "bob")
    assert await call(client, bob_token, "POST", "/b/alice/1/restart") == (
        400,
        {"manifest": ["Manifest driver error: os - driver disabled"]},
    )
    assert (await call(client, owner, "POST", "/b/alice/1/restart"))[0] == 201


# -- Resuming from a job -------------------------------------------------------------------------


async def keep(conn: asyncpg.Connection, build: dict[str, Any], seconds: float = 3600.0) -> None:
    """Record the build's workspace kept, as its runner does when it ends (docs/api.md §27)."""
    await conn.execute(
        """
        INSERT INTO kept_workspaces (build_id, attempt, driver, place, location, expires_at)
        VALUES ($1, 1, 'docker', 'docker:engine-1', 'marid-volume',
                now() + make_interval(secs => $2))
        """,
        build["id"],
        seconds,
    )


async def set_job_statuses(
    conn: asyncpg.Connection, build: dict[str, Any], **statuses: str
) -> None:
    for name, status in statuses.items():
        await conn.execute(
            "UPDATE build_jobs SET status = $3 WHERE build_id = $1 AND name = $2",
            build["id"],
            name.replace("_", "-").replace("build-1", "build.1"),
            status,
        )


async def failed_in_unit(
    client: TestClient, token: str, conn: asyncpg.Connection
) -> dict[str, Any]:
    """alice's build #1, failed in its last job, `unit`, with its workspace kept."""
    original = await submit(client, token)
    await finish(conn, original, "failed")
    await set_job_statuses(conn, original, create_driver="passed", build_1="passed", unit="failed")
    await keep(conn, original)
    return original


async def test_a_resume_reuses_the_jobs_before_the_named_one_and_waits_for_its_workspace(
    client: TestClient, token: MakeToken, conn: asyncpg.Connection
):
    alice = await token(SCOPE)
    await failed_in_unit(client, alice, conn)
    status, made = await call(client, alice, "POST", "/b/alice/1/restart", json={"from": "unit"})
    assert status == 201, made
    assert made["trigger"]["comment"] == "Resume of #1 from unit"
    assert made["restarted_from"] == f"{BASE}/b/alice/1"
    _, jobs = await call(client, alice, "GET", "/b/alice/2/jobs")
    assert [(j["name"], j["status"], j["reused_from"]) for j in jobs] == [
        ("create-driver", "queued", None),  # always runs: it copies the workspace
        ("build.1", "passed", f"{BASE}/b/alice/1/jobs/build.1"),
        ("unit", "queued", None),
    ]
    # Only a runner reaching the workspace's place takes it.
    await runners.announce(conn, "elsewhere", ["docker"], 2, places=["docker:engine-2"])
    _, shown = await call(client, alice, "GET", "/b/alice/2")
    assert shown["pending"]["reason"] == "no runner reaches the workspace it resumes from"
    async with conn.transaction():
        assert (
            await lifecycle.claim(conn, "elsewhere", ["docker"], 30.0, None, ["docker:engine-2"])
            is None
        )
    await runners.announce(conn, "holder", ["docker"], 2, places=["docker:engine-1"])
    _, shown = await call(client, alice, "GET", "/b/alice/2")
    assert shown["pending"]["reason"] == "waiting for a runner slot (0 ahead)"
    async with conn.transaction():
        claim = await lifecycle.claim(conn, "holder", ["docker"], 30.0, None, ["docker:engine-1"])
    assert claim is not None and claim.build_id == made["id"]
    loaded = await lifecycle.load(conn, claim)
    assert loaded.resume is not None and loaded.resume.job == "unit"
    assert loaded.resume.workspace is not None
    assert loaded.resume.workspace.location == "marid-volume"
    assert [(j.name, j.reused) for s in loaded.stages for j in s.jobs] == [
        ("create-driver", None),
        ("build.1", "passed"),
        ("unit", None),
    ]
    # The original is not changed, and keeps its workspace while the resume may copy it.
    assert (await call(client, alice, "GET", "/b/alice/1"))[1]["status"] == "failed"
    await conn.execute("UPDATE kept_workspaces SET expires_at = now() - interval '1 s'")
    assert await conn.fetchval("SELECT workspace_kept(k) FROM kept_workspaces k") is True
    async with conn.transaction():
        await lifecycle.build_finished(conn, claim, "passed")
    assert await conn.fetchval("SELECT workspace_kept(k) FROM kept_workspaces k") is False


async def test_a_resume_needs_every_earlier_job_passed(
    client: TestClient, token: MakeToken, conn: asyncpg.Connection
):
    alice = await token(SCOPE)
    original = await failed_in_unit(client, alice, conn)
    await set_job_statuses(conn, original, build_1="failed")
    assert await call(client, alice, "POST", "/b/alice/1/restart", json={"from": "unit"}) == (
        400,
        {"from": ["Job build.1, before unit, did not pass: resume from it or an earlier job"]},
    )
    status, made = await call(client, alice, "POST", "/b/alice/1/restart", json={"from": "build.1"})
    assert status == 201, made


async def test_a_resume_needs_the_workspace_kept_and_says_until_when_it_was(
    client: TestClient, token: MakeToken, conn: asyncpg.Connection
):
    alice = await token(SCOPE)
    original = await submit(client, alice)
    await finish(conn, original, "failed")
    await set_job_statuses(conn, original, create_driver="passed", build_1="passed")
    assert await call(client, alice, "POST", "/b/alice/1/restart", json={"from": "unit"}) == (
        400,
        {
            "from": [
                "Build #1 has no kept workspace: only a build that ended failed, killed or"
                " timed_out with the docker, os or qemu driver keeps its workspace, for"
                " builds.keep_workspace: restart without from"
            ]
        },
    )
    await keep(conn, original, seconds=-60)
    until = await conn.fetchval(
        "SELECT to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
        " FROM kept_workspaces"
    )
    assert await call(client, alice, "POST", "/b/alice/1/restart", json={"from": "unit"}) == (
        400,
        {
            "from": [
                f"The workspace of build #1 was kept until {until} (builds.keep_workspace):"
                " restart without from"
            ]
        },
    )
    _, listed = await call(client, alice, "GET", "/builds")
    assert len(listed) == 1
    assert (await call(client, alice, "POST", "/b/alice/1/restart"))[0] == 201  # a whole one


async def test_a_restart_keeps_the_originals_cache_scope(
    client: TestClient, token: MakeToken, conn: asyncpg.Connection
):
    """The cache (docs/manifest.md §10) is part of the snapshot: the restart saves and restores
    the same entry as the original."""
    alice = await token(SCOPE)
    original = await submit(client, alice, MANIFEST + "cache: {key: deps, paths: [vendor]}\n")
    await finish(conn, original, "failed")
    status, made = await call(client, alice, "POST", "/b/alice/1/restart")
    assert status == 201, made
    rows = await conn.fetch("SELECT build_id, key, paths FROM build_caches ORDER BY build_id")
    assert [(r["build_id"], r["key"], r["paths"]) for r in rows] == [
        (original["id"], "deps", ["vendor"]),
        (made["id"], "deps", ["vendor"]),
    ]
