"""A runner announces itself while it runs and withdraws when it stops (issue 12 part 3,
marid/runners.py): a queued build for a driver it offers waits for it; once it stops, the
build says that no runner is running."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg

from marid import builds, runners
from marid.config import Config
from marid.runner.drivers.os import os_place
from marid.runners import Offer
from tests.runner.conftest import background_worker

WAIT, STEP = 60.0, 0.05  # a bound on the wait, and the polling step


async def test_a_runner_announces_its_drivers_while_it_runs_and_withdraws_when_it_stops(
    config: Config, pool: asyncpg.Pool
):
    os_config = dataclasses.replace(
        config,
        drivers=["os"],
        runner=dataclasses.replace(config.runner, name="presence-test", lease=3.0),
    )
    async with pool.acquire() as conn:
        async with background_worker(os_config, pool, stop_timeout=30) as worker:
            for _ in range(int(WAIT / STEP)):
                if (await runners.offered(conn)).runners:
                    break
                await asyncio.sleep(STEP)
            assert await runners.offered(conn) == Offer(1, frozenset({"os"}))
            row = await conn.fetchrow("SELECT * FROM runners")
            assert (row["name"], row["drivers"], row["parallelism"]) == (
                worker.name,
                ["os"],
                os_config.runner.parallelism,
            )
            assert row["announce_interval"] == runners.interval_for(os_config.runner.lease)
            assert row["places"] == [os_place()]  # where it keeps workspaces (docs/api.md §27)
            first = builds.Hold(None, None, 0)  # nothing holds it back, nothing ahead
            waiting = builds.pending(await runners.offered(conn), "os", first)
            assert waiting == builds.Pending(builds.WAITING.format(ahead=0), 1)
        assert await conn.fetchval("SELECT count(*) FROM runners") == 0
        gone = builds.pending(await runners.offered(conn), "os", first)
        assert gone == builds.Pending(builds.NO_RUNNER, 1)
