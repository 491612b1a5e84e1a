"""Issue 14 item 1's acceptance on real runners: a three-job build that fails in job 3 keeps its
workspace, is resumed from job 3 and passes without running jobs 1 and 2 again, whose files
are in the resumed build's workspace, on the os driver and on the Docker engine. The kept
workspace is copied, not handed over: the original can be resumed again; once no longer kept,
the runner's reaper removes it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import docker
import pytest
from aiohttp.test_utils import TestClient

from marid.api.app import create_app
from marid.blobs import open_store
from marid.config import Config
from marid.runner.reaper import RunnerReaper
from marid.runner.worker import Worker, instance_of
from tests.conftest import MakeToken, bearer
from tests.runner.conftest import BUSYBOX, background_worker
from tests.runner.test_worker import finished, wait_for

SCOPE = "build:read,write,delete"
# Job 3 fails the first time: it marks the workspace, which only a copy of this workspace
# carries into another build. Jobs 1 and 2 append to a log each time they run.
JOBS = """\
stages: [one, two, three]
jobs:
- stage: one
  commands:
  - echo one >> log.txt
- stage: two
  commands:
  - echo two >> log.txt
- stage: three
  commands:
  - cat log.txt
  - test -e third-ran || { touch third-ran; echo failing; exit 1; }
  - echo three >> log.txt
"""
OS = "driver: {type: os}\n" + JOBS
DOCKER = f"driver: {{type: docker, image: '{BUSYBOX}', workspace: /w}}\n" + JOBS


def keeping(config: Config, drivers: list[str]) -> Config:
    return dataclasses.replace(
        config,
        drivers=drivers,
        builds=dataclasses.replace(config.builds, keep_workspace=3600.0),
        docker=dataclasses.replace(config.docker, network="none"),
        runner=dataclasses.replace(config.runner, lease=5.0),
    )


@pytest.fixture(params=["os", "docker"])
def driver(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        request.getfixturevalue("docker_engine")  # the engine, or the docker tests' skip
    return str(request.param)


@pytest.fixture
def runner_config(config: Config, driver: str) -> Config:
    return keeping(config, [driver])


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], runner_config: Config, pool: asyncpg.Pool
) -> TestClient:
    return await aiohttp_client(create_app(runner_config, pool))


@pytest.fixture
async def worker(runner_config: Config, pool: asyncpg.Pool) -> AsyncIterator[Worker]:
    async with background_worker(runner_config, pool, stop_timeout=30) as running:
        yield running


async def post(client: TestClient, token: str, path: str, body: Any) -> dict[str, Any]:
    resp = await client.post(f"/api{path}", headers=bearer(token), json=body)
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


async def jobs(client: TestClient, token: str, number: int) -> dict[str, dict[str, Any]]:
    resp = await client.get(f"/api/b/alice/{number}/jobs", headers=bearer(token))
    return {job["name"]: job for job in await resp.json()}


async def test_a_build_failing_in_job_3_resumes_from_job_3_and_passes(
    client: TestClient, token: MakeToken, worker: Worker, driver: str, pool: asyncpg.Pool
):
    alice = await token(SCOPE)
    manifest = OS if driver == "os" else DOCKER
    first = await post(client, alice, "/builds", {"manifest": manifest})
    done = await wait_for(client, alice, first["url"], finished)
    assert done["status"] == "failed"
    async with pool.acquire() as conn:
        kept = await conn.fetchrow("SELECT * FROM kept_workspaces WHERE build_id = $1", first["id"])
    assert kept is not None and kept["driver"] == driver
    assert kept["place"] == worker.places[driver]

    resumed = await post(client, alice, "/b/alice/1/restart", {"from": "three.1"})
    again = await wait_for(client, alice, resumed["url"], finished)
    assert again["status"] == "passed", again["output"]
    by_name = await jobs(client, alice, 2)
    for name in ("one.1", "two.1"):  # not run again: reused, linked to the original's
        assert by_name[name]["status"] == "passed"
        assert by_name[name]["reused_from"].endswith(f"/b/alice/1/jobs/{name}")
        assert by_name[name]["started_at"] is None and by_name[name]["output"] is None
    third = by_name["three.1"]
    assert third["status"] == "passed" and third["reused_from"] is None
    # Jobs 1 and 2 ran once, in the original, and their file is in the copy.
    assert "+ cat log.txt\none\ntwo\n+ test -e third-ran\n" in third["output"]
    assert "Resuming build #1 from job three.1" in by_name["create-driver"]["output"]

    # A copy: the resumed build's own writes (`three`) stay in its copy, and the original's
    # workspace, untouched, is resumed again.
    twice = await post(client, alice, "/b/alice/1/restart", {"from": "three.1"})
    assert (await wait_for(client, alice, twice["url"], finished))["status"] == "passed"
    third_again = (await jobs(client, alice, 3))["three.1"]["output"]
    assert "+ cat log.txt\none\ntwo\n+ test -e third-ran\n" in third_again
    # The resumed build passed: it kept nothing of its own.
    async with pool.acquire() as conn:
        count = await conn.fetchval("SELECT count(*) FROM kept_workspaces")
    assert count == 1


async def test_the_reaper_removes_a_workspace_once_it_is_no_longer_kept(
    client: TestClient,
    token: MakeToken,
    worker: Worker,
    driver: str,
    pool: asyncpg.Pool,
    runner_config: Config,
    db_dsn: str,
):
    alice = await token(SCOPE)
    first = await post(client, alice, "/builds", {"manifest": OS if driver == "os" else DOCKER})
    assert (await wait_for(client, alice, first["url"], finished))["status"] == "failed"
    async with pool.acquire() as conn:
        location = await conn.fetchval("SELECT location FROM kept_workspaces")
    assert await exists(driver, location)

    reaper = RunnerReaper(
        runner_config, pool, open_store(runner_config.storage), instance_of(db_dsn)
    )
    try:
        await reaper.tick(datetime.now(UTC))
        assert await exists(driver, location)  # kept for an hour
        async with pool.acquire() as conn:
            await conn.execute("UPDATE kept_workspaces SET expires_at = now() - interval '1 s'")
        await reaper.tick(datetime.now(UTC))
        assert not await exists(driver, location)
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM kept_workspaces") == 0
    finally:
        reaper.close()
    resp = await client.post(
        "/api/b/alice/1/restart", headers=bearer(alice), json={"from": "three.1"}
    )
    assert resp.status == 400
    assert "has no kept workspace" in (await resp.json())["from"][0]


async def exists(driver: str, location: str) -> bool:
    if driver == "os":
        from pathlib import Path

        return Path(location).is_dir()

    def look() -> bool:
        client = docker.from_env()
        try:
            client.volumes.get(location)
            return True
        except docker.errors.NotFound:
            return False
        finally:
            client.close()

    return await asyncio.to_thread(look)
