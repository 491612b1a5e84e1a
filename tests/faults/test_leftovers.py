"""Nothing leaks (issue 10, Acceptance 3): after kill -9 of serve mid-upload, kill -9 of a
runner mid-artifact, and a DELETE of a build whose runner is dead, the killed processes are
started again and within a reaper period no upload spool file, unfinished (`.part`) blob,
orphan blob, container or volume remains (docs/configuration.md §1.3, `reaper`).

The reaper runs every 3 s with a grace of 1 s here, and leases last 3 s, so the waits are
short; each is bounded by far more than the few periods it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from marid.uploads import SPOOL
from tests.faults.conftest import Installation, Starter, until

pytestmark = pytest.mark.docker

INTERVAL = 3  # seconds: reaper.interval
SETTINGS = {
    "reaper": {"interval": f"{INTERVAL}s", "grace": "1s"},
    "runner": {"lease": "3s"},
    "artifacts": {"max_size": "1g"},
}
CLEAN = 10 * INTERVAL + 30  # seconds: the bound on waiting for the sweeps (a few periods each)
CHUNK = b"x" * (256 * 1024)
BIG = 512  # MiB: an artifact that takes a moment to collect and store
ARTIFACT = f"""\
driver: {{type: docker, image: 'marid-test/busybox:latest', workspace: /w}}
stages: [s]
jobs:
- stage: s
  commands: [set +x, 'dd if=/dev/zero of=big.bin bs=1M count={BIG} 2>/dev/null', echo made]
  artifacts: [big.bin]
"""
SLEEPER = """\
driver: {type: docker, image: 'marid-test/busybox:latest', workspace: /w}
stages: [s]
jobs:
- stage: s
  commands: [set +x, echo ready, sleep 600]
"""


@pytest.fixture
async def marid(shared_dsn: str, start_marid: Starter) -> Installation:
    return await start_marid(shared_dsn, **SETTINGS)


async def clean(marid: Installation) -> None:
    """Return once nothing is left over; fail listing what still is."""
    left: list[str] = []

    async def nothing_left() -> bool:
        left[:] = await marid.leftovers()
        return not left

    try:
        await until("the reapers to remove what was left", nothing_left, CLEAN)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still there: {left}") from None


def spool_files(marid: Installation) -> list[Path]:
    return [p for p in marid.temp.glob(f"{SPOOL[0]}*{SPOOL[1]}") if p.stat().st_size]


@contextlib.asynccontextmanager
async def stalled_upload(marid: Installation) -> AsyncIterator[None]:
    """An upload to POST /objects that sends 1 MiB, then nothing more, until the context
    ends; entered once serve spools it."""
    forever = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield CHUNK
        await forever.wait()

    async def upload() -> None:
        async with aiohttp.ClientSession() as session:
            await session.post(
                f"{marid.url}/objects", params={"name": "big.bin"}, headers=marid.headers,
                data=body(),
            )  # fmt: skip

    task = asyncio.create_task(upload())
    try:

        async def spooled() -> bool:
            assert not task.done(), task
            return bool(spool_files(marid))

        await until("serve to spool the upload", spooled)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await task


async def test_serve_killed_mid_upload_leaves_nothing_after_a_sweep(marid: Installation):
    async with stalled_upload(marid):
        marid.kill("serve")
    assert spool_files(marid), "the spool file of the killed upload"
    marid.start("serve")
    await marid.serving()

    await clean(marid)
    status, objects = await marid.request("GET", "/objects")
    assert (status, objects) == (200, [])
    marid.assert_running()


async def test_a_runner_killed_mid_artifact_leaves_nothing_after_a_sweep(marid: Installation):
    build = await marid.submit(ARTIFACT)
    await marid.until_output(build, "s.1", "Collecting artifact big.bin")
    runner = await marid.runner_of(build)

    async def storing() -> bool:  # the artifact's content is being written to the store
        return any(p.stat().st_size for p in marid.blobs.glob("*/.*.part"))

    await until("the runner to store the artifact", storing)
    marid.kill(runner)
    marid.start(runner)

    done = await marid.finished(build)  # a new attempt runs it to the end
    assert done["status"] == "passed", done["output"]
    assert done["attempts"] == 2
    await clean(marid)
    status, artifacts = await marid.request("GET", f"/b/alice/{build['number']}/artifacts")
    assert status == 200
    assert [(a["name"], a["size"]) for a in artifacts] == [("big.bin", BIG * 1024 * 1024)]
    marid.assert_running()


async def test_a_build_deleted_while_its_runner_is_dead_leaves_nothing(marid: Installation):
    build = await marid.submit(SLEEPER)
    await marid.until_output(build, "s.1", "ready\n")
    runner = await marid.runner_of(build)
    marid.kill(runner)  # its container sleeps on: no runner watches it
    assert await asyncio.to_thread(marid.containers, build=build["id"], job="s.1")

    status, body = await marid.request("DELETE", f"/b/alice/{build['number']}")
    assert status == 204, body
    marid.start(runner)

    done = await marid.finished(build)
    assert done["status"] == "killed", done["output"]
    await clean(marid)
    marid.assert_running()
