"""A job's container killed from outside (issue 10, docs/manifest.md §6.8): the build ends
`failed`, the job's last output line says why, and nothing of the build stays on the engine."""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.conftest import Starter, until

pytestmark = pytest.mark.docker

READY_THEN_SLEEP = """\
driver: {type: docker, image: 'marid-test/busybox:latest', workspace: /w}
stages: [s]
jobs:
- stage: s
  commands: [set +x, echo ready, sleep 600]
"""


async def test_a_container_killed_from_outside_fails_the_build_and_says_why(
    shared_dsn: str, start_marid: Starter
):
    marid = await start_marid(shared_dsn)
    build = await marid.submit(READY_THEN_SLEEP)
    await marid.until_output(build, "s.1", "ready\n")

    (container,) = await asyncio.to_thread(marid.containers, build=build["id"], job="s.1")
    await asyncio.to_thread(container.kill)  # `docker kill`: SIGKILL

    done = await marid.finished(build)
    assert done["status"] == "failed", done["output"]
    output = await marid.job_output(build, "s.1")
    assert output == "+ set +x\nready\nkilled by signal 9 (SIGKILL)\n"
    assert output.splitlines()[-1] == "killed by signal 9 (SIGKILL)"

    async def gone() -> bool:
        return not await asyncio.to_thread(marid.engine_leftovers)

    await until(f"the build's containers and volumes to go: {marid.engine_leftovers()}", gone)
    marid.assert_running()
