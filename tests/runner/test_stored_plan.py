"""A runner executes the driver settings stored at submission and never re-parses the manifest
(docs/architecture.md §3.1), on the real Docker engine."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import asyncpg
import docker
import pytest
from aiohttp.test_utils import TestClient

from marid.api.app import create_app
from marid.blobs import open_store
from marid.config import Config
from marid.runner.worker import Worker
from tests.conftest import MakeToken
from tests.runner.conftest import BUSYBOX
from tests.runner.test_worker import finished, submit, wait_for

pytestmark = pytest.mark.docker
MANIFEST = f"""\
driver: {{type: docker, image: "{BUSYBOX}", workspace: /stored}}
stages: [s]
jobs: [{{stage: s, commands: [pwd]}}]
"""
# What the row says after submission: another image that does not exist, another workspace.
REWRITTEN = MANIFEST.replace(BUSYBOX, "marid-test/nowhere:1").replace("/stored", "/rewritten")


async def test_a_build_runs_with_the_driver_settings_stored_at_submission(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    config: Config,
    pool: asyncpg.Pool,
    token: MakeToken,
    docker_engine: docker.DockerClient,
):
    config = dataclasses.replace(
        config,
        drivers=["docker"],
        docker=dataclasses.replace(config.docker, network="none", pull="never"),
    )
    client = await aiohttp_client(create_app(config, pool))
    value = await token("build:read,write")
    build = await submit(client, value, MANIFEST)
    await pool.execute("UPDATE builds SET manifest = $1", REWRITTEN)

    blobs = open_store(config.storage)
    stop = asyncio.Event()
    running = asyncio.create_task(Worker(config, pool, blobs).run(stop))
    try:
        done = await wait_for(client, value, build["url"], finished)
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)
        await blobs.close()
    assert done["status"] == "passed", done["output"]
    assert "+ pwd\n/stored\n" in done["output"]
    assert done["manifest"] == REWRITTEN
