"""Two real runners, each with room for two builds, share one namespace limited to three
running builds (issue 14 item 3): the database holds the rest back, whichever runner asks,
and every build still runs to its end. Three at once needs both runners, so the limit is
reached only through both of them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp.test_utils import TestClient

from marid.api.app import create_app
from marid.config import Config
from tests.api.helpers import create_namespace
from tests.conftest import MakeToken, bearer
from tests.runner.conftest import background_worker

SCOPE = "build:read,write namespace:read,write"
BUILDS = 8
LIMIT = 3
# Each build notes when it starts and ends in a file every build shares, so that the test
# sees the overlap of the builds' commands themselves, not only of their database rows.
MANIFEST = """\
namespace: team
driver:
  type: os
stages:
- s
jobs:
- stage: s
  commands:
  - echo "start $$" >> {log}
  - sleep 0.6
  - echo "end $$" >> {log}
"""


def runner_config(config: Config, name: str) -> Config:
    return dataclasses.replace(
        config,
        drivers=["os"],
        runner=dataclasses.replace(config.runner, name=name, lease=5.0, parallelism=2),
    )


def most_at_once(lines: list[str]) -> int:
    """The most builds between their `start` and `end` lines at one time."""
    now = worst = 0
    for line in lines:
        now += 1 if line.startswith("start") else -1
        worst = max(worst, now)
    return worst


async def test_two_runners_never_run_more_than_the_namespaces_limit(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    config: Config,
    pool: asyncpg.Pool,
    token: MakeToken,
    tmp_path,
):
    client = await aiohttp_client(create_app(runner_config(config, "api"), pool))
    alice = await token(SCOPE)
    await create_namespace(client, alice, "team", max_running=LIMIT)
    log = tmp_path / "overlap.log"
    log.touch()
    urls = []
    for _ in range(BUILDS):
        resp = await client.post(
            "/api/builds",
            headers=bearer(alice),
            json={"manifest": MANIFEST.format(log=log)},
        )
        assert resp.status == 201, await resp.text()
        urls.append((await resp.json())["url"].removeprefix("https://ci.example.com"))

    most_running = 0
    async with contextlib.AsyncExitStack() as stack:
        for name in ("runner-a", "runner-b"):
            await stack.enter_async_context(
                background_worker(runner_config(config, name), pool, stop_timeout=30)
            )
        for _ in range(600):
            async with pool.acquire() as conn:
                running = await conn.fetchval(
                    "SELECT count(*) FROM builds WHERE status = 'running'"
                )
                done = await conn.fetchval(
                    "SELECT count(*) FROM builds WHERE finished_at IS NOT NULL"
                )
                runners_used = await conn.fetchval(
                    "SELECT count(DISTINCT runner) FROM builds WHERE runner IS NOT NULL"
                )
            most_running = max(most_running, running)
            if done == BUILDS:
                break
            await asyncio.sleep(0.05)
    statuses = [
        (await (await client.get(url, headers=bearer(alice))).json())["status"] for url in urls
    ]
    assert statuses == ["passed"] * BUILDS
    assert most_running <= LIMIT
    assert most_at_once(log.read_text().splitlines()) == LIMIT  # used, never exceeded
    assert runners_used == 2
