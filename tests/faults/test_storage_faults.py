"""A blob store failing writes for 80 s while a build stores its artifact (issue 10,
Acceptance 2): the build is retried as new attempts, and ends `passed` when the fault clears
before its last attempt, or `failed` after `runner.max_attempts` with the reason as the last
line of its output; it is never `running` again after that.

The faults, each undone after 80 s and in any case when the scenario ends:

- passed: the fs store's directory made immutable (`chattr -R +i`: EPERM for every new file
  or shard). A retry waits `runner.retry_delay`, doubled at each attempt, so attempts start
  at about 0, 17, 49 and 111 s: the first three fail inside the fault, the fourth and last
  comes after it;
- failed: the store's directory on a tiny tmpfs that is full (ENOSPC); attempts start at
  about 0, 4 and 10 s, all inside the fault.

Each scenario runs on an installation of its own and takes 80 s or more, so both start in the
background when the package's first test starts (conftest.py `storage_faults`); these tests
only wait for them and report.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.faults.conftest import FINAL, Installation, StorageFaults, attach

pytestmark = pytest.mark.docker

FAULT = 80.0  # seconds the blob store fails writes (the scenario)
LEASE = 5.0  # seconds: runner.lease
BOUND = 300.0  # seconds from submission by which each scenario's build has ended
CONTENT = "artifact content"
EPERM = "[Errno 1] Operation not permitted"  # what an immutable directory answers
ENOSPC = "[Errno 28] No space left on device"  # what a full file system answers
NEEDS_ROOT = "the storage faults need root (chattr +i, mount -t tmpfs)"
MANIFEST = f"""\
driver: {{type: docker, image: 'marid-test/busybox:latest', workspace: /w}}
stages: [s]
jobs:
- stage: s
  commands: [set +x, echo {CONTENT} > out.txt, echo made]
  artifacts: [out.txt]
"""


@dataclass
class Scenario:
    sections: dict[str, Any]
    run: Callable[[Installation], Awaitable[None]]


def immutable(marid: Installation, on: bool) -> None:
    flag = "+i" if on else "-i"
    subprocess.run(["chattr", "-R", flag, str(marid.blobs)], check=True, capture_output=True)


def full(marid: Installation, on: bool) -> None:
    """Mount a 64 KiB tmpfs over the store's (empty) directory and fill it, or unmount it."""
    if on:
        where = str(marid.blobs)
        command = ["mount", "-t", "tmpfs", "-o", "size=64k", "marid-full", where]
        subprocess.run(command, check=True, capture_output=True)
        with contextlib.suppress(OSError), (marid.blobs / "filler").open("wb") as filler:
            filler.write(b"x" * 128 * 1024)  # ENOSPC once 64 KiB are written
            filler.flush()
    else:
        subprocess.run(["umount", str(marid.blobs)], check=True, capture_output=True)


async def watch(marid: Installation, build: dict[str, Any], until: float) -> list[str]:
    """The build's statuses, looked at every half second until the monotonic time `until`."""
    seen: list[str] = []
    while time.monotonic() < until:
        status = (await marid.build(build))["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        await asyncio.sleep(0.5)
    return seen


async def ends_passed(marid: Installation) -> None:
    await marid.start_all()
    immutable(marid, True)
    try:
        build = await marid.submit(MANIFEST)
        fault_ends = time.monotonic() + FAULT
        during = await watch(marid, build, fault_ends)
    finally:
        immutable(marid, False)
    assert set(during) <= {"queued", "running"}, f"ended while the store failed: {during}"
    assert (await marid.build(build))["attempts"] > 1, "the failing attempts were not retried"

    done = await marid.finished(build, BOUND - FAULT)
    assert done["status"] == "passed", done["output"]
    assert 1 < done["attempts"] <= 4, done["attempts"]
    attempt, previous = done["attempts"], done["attempts"] - 1
    assert done["output"].startswith(  # why the previous attempt ended (docs/manifest.md §6.13)
        f"marid: attempt {attempt} (attempt {previous}: storing artifact out.txt: {EPERM})\n"
    ), done["output"]
    assert "orphaned" in done["tags"], done["tags"]
    output = await marid.job_output(build, "s.1")
    assert output == "+ set +x\nmade\nCollecting artifact out.txt => out.txt\n", output
    path = f"/b/alice/{build['number']}/artifacts/out.txt"
    accept = {"Accept": "application/octet-stream"}
    async with marid.http.get(marid.url + path, headers={**marid.headers, **accept}) as resp:
        assert resp.status == 200
        assert await resp.text() == f"{CONTENT}\n"
    after = await watch(marid, build, time.monotonic() + 2 * LEASE)
    assert after == ["passed"], after
    marid.assert_running()


async def ends_failed(marid: Installation) -> None:
    await marid.start_all()
    full(marid, True)
    try:
        build = await marid.submit(MANIFEST)
        fault_ends = time.monotonic() + FAULT
        done = await marid.finished(build, FAULT - 10)
        during = await watch(marid, build, fault_ends)  # the rest of the fault
    finally:
        full(marid, False)
    assert done["status"] == "failed", done["output"]
    assert done["attempts"] == 3, done["attempts"]  # runner.max_attempts
    # The reason, last (docs/manifest.md §6.13, "The last attempt").
    assert done["output"].endswith(
        "Collecting artifact out.txt => out.txt\n"
        f"marid: attempt 3 of 3 failed: storing artifact out.txt: {ENOSPC}; giving up\n"
    ), done["output"]
    assert during == ["failed"], during

    after = await watch(marid, build, time.monotonic() + 2 * LEASE + 5)  # the store works now
    assert after == ["failed"], after
    again = await marid.build(build)
    assert (again["status"], again["attempts"]) == ("failed", 3)
    assert again["status"] in FINAL
    marid.assert_running()


SCENARIOS = {
    "test_a_store_failing_for_80s_then_working_again_ends_passed": Scenario(
        {"runner": {"lease": f"{LEASE:g}s", "max_attempts": 4, "retry_delay": "15s"}},
        ends_passed,
    ),
    "test_a_store_failing_through_every_attempt_ends_failed_with_the_reason": Scenario(
        {"runner": {"lease": f"{LEASE:g}s", "max_attempts": 3, "retry_delay": "2s"}},
        ends_failed,
    ),
}


async def outcome(request: pytest.FixtureRequest, faults: StorageFaults) -> None:
    name = request.node.originalname
    if name not in faults.tasks:
        pytest.skip(NEEDS_ROOT)
    attach(request.node, faults.installations[name])
    task = faults.tasks[name]
    done, _ = await asyncio.wait([task], timeout=BOUND + 120)
    assert done, f"the scenario still runs after {BOUND + 120:g}s"
    task.result()  # its assertion, if one failed


async def test_a_store_failing_for_80s_then_working_again_ends_passed(
    request: pytest.FixtureRequest, storage_faults: StorageFaults
):
    await outcome(request, storage_faults)


async def test_a_store_failing_through_every_attempt_ends_failed_with_the_reason(
    request: pytest.FixtureRequest, storage_faults: StorageFaults
):
    await outcome(request, storage_faults)
