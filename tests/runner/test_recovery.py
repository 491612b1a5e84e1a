"""kill -9 of a real `marid runner` process mid-build: another runner recovers the build
after the lease expires, and nothing of the dead attempt survives (docs/manifest.md §6.13)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
import yaml
from aiohttp.test_utils import TestClient

from marid.api.app import create_app
from marid.blobs import open_store
from marid.config import Config
from marid.runner.worker import Worker
from tests.conftest import MakeToken, bearer
from tests.runner.test_worker import finished, submit, wait_for

MANIFEST = """\
driver: {type: os}
stages: [s]
jobs:
- stage: s
  commands:
  - echo "attempt starts"
  - sleep 2
  - echo built > app.txt
  artifacts:
  - app.txt
"""


@pytest.fixture
def os_config(config: Config) -> Config:
    runner = dataclasses.replace(config.runner, lease=1.5, parallelism=1)
    return dataclasses.replace(config, drivers=["os"], runner=runner)


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], os_config: Config, pool: asyncpg.Pool
) -> TestClient:
    return await aiohttp_client(create_app(os_config, pool))


def runner_process(config: Config, tmp_path: Path) -> subprocess.Popen[bytes]:
    path = tmp_path / "runner.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"url": config.server.url},
                "database": {"dsn": config.database.dsn},
                "crypto": {"key": config.crypto.key},
                "drivers": ["os"],
                "storage": {"backend": "fs", "path": config.storage.path},
                "runner": {"lease": "1s", "name": "doomed"},
            }
        )
    )
    return subprocess.Popen(
        [sys.executable, "-m", "marid", "--config", str(path), "runner"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_kill_9_of_a_runner_mid_build_is_recovered(
    client: TestClient, token: MakeToken, pool: asyncpg.Pool, os_config: Config, tmp_path: Path
):
    value = await token("build:read,write")
    doomed = runner_process(os_config, tmp_path)
    try:
        build = await submit(client, value, MANIFEST)
        await wait_for(
            client,
            value,
            build["url"] + "/jobs/s.1",
            lambda job: job["status"] == "running",
        )
        assert await pool.fetchval("SELECT runner FROM builds") == "doomed"
        os.kill(doomed.pid, signal.SIGKILL)
    finally:
        doomed.wait(10)
    body = await (
        await client.get(build["url"].removeprefix("https://ci.example.com"), headers=bearer(value))
    ).json()
    assert body["status"] == "running"  # nobody has noticed yet

    blobs = open_store(os_config.storage)
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(os_config, pool, blobs).run(stop))
    try:
        done = await wait_for(client, value, build["url"], finished)
    finally:
        stop.set()
        await task
        await blobs.close()
    assert done["status"] == "passed", done["output"]
    assert "orphaned" in done["tags"]
    assert done["output"].count("attempt starts") == 2  # the command echo and its output, once
    assert await pool.fetchval("SELECT attempt FROM builds") == 2
    assert await pool.fetchval("SELECT count(*) FROM builds WHERE status = 'running'") == 0
    artifacts = await pool.fetch("SELECT name, size FROM build_artifacts")
    assert [tuple(r) for r in artifacts] == [("app.txt", 6)]
    stored = [p for p in Path(os_config.storage.path).rglob("*") if p.is_file()]
    assert len(stored) == 1  # one artifact blob, none left from the dead attempt
    # Live chunks: the dead attempt's dropped at recovery, the second's once its jobs ended.
    assert await pool.fetchval("SELECT count(*) FROM build_job_output") == 0
