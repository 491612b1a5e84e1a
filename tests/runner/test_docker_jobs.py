"""A docker build's jobs, each container made and started ahead while the job before runs
(docs/manifest.md §9.2, issue 14 item 5), through the execution engine and the real engine:
the jobs share the workspace and nothing else, a held job runs only when its turn comes, and
nothing is left behind whatever ends the build."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import docker
import pytest
from docker.errors import NotFound

from marid.runner.drivers.base import Limits, Upcoming
from marid.runner.drivers.docker import LABEL_BUILD, DockerDriver
from marid.runner.execute import Execution, JobSpec, StageSpec
from tests.runner.conftest import BUSYBOX
from tests.runner.test_docker_driver import Output, nothing_uploaded
from tests.runner.test_execute import Recorder, spec

pytestmark = pytest.mark.docker

WORKSPACE = "/w"
LIMITS = Limits(memory=64 * 1024**2, cpus=1.0, pids=64)
_build_ids = itertools.count(random.randrange(10**6, 10**9, 1000))
# A job that waits until the test creates `gate` in the workspace.
GATED = "until [ -e gate ]; do sleep 0.05; done"


@pytest.fixture
async def make_driver(docker_engine: docker.DockerClient) -> AsyncIterator[Callable[..., Any]]:
    """`make_driver(**settings)` -> a busybox driver for a new build, destroyed afterwards."""
    drivers: list[DockerDriver] = []

    def make(**settings: Any) -> DockerDriver:
        driver = DockerDriver(
            docker_engine,
            build_id=next(_build_ids),
            attempt=1,
            image=BUSYBOX,
            workspace=WORKSPACE,
            limits=LIMITS,
            network="none",
            pull="never",
            uploaded=nothing_uploaded,
            **settings,
        )
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        await driver.destroy()


def containers(engine: docker.DockerClient, driver: DockerDriver) -> list[dict[str, Any]]:
    """The build's containers as the engine lists them (no inspect of each: one may be gone
    by then)."""
    filters = {"label": f"{LABEL_BUILD}={driver.build_id}"}
    return list(engine.api.containers(all=True, filters=filters))


async def held(
    engine: docker.DockerClient, driver: DockerDriver, job: str, recorder: Recorder | None = None
) -> Any:
    """The container of `job`, once the engine has started it (held: its job waits)."""
    try:
        async with asyncio.timeout(60):
            while True:
                for found in containers(engine, driver):
                    if found["Labels"].get("marid.job") == job and found["State"] == "running":
                        return engine.containers.get(found["Id"])
                await asyncio.sleep(0.05)
    except TimeoutError:
        seen = recorder and (recorder.status, recorder.output)
        raise AssertionError(f"{job} not held; {containers(engine, driver)}; {seen}") from None


@pytest.fixture
def observer(docker_engine: docker.DockerClient) -> Iterator[Callable[[DockerDriver], Any]]:
    """`observer(driver)` -> a container of the test's own with the build's workspace mounted
    at /w: it sees what the jobs wrote, and keeps the volume past the build's end (the driver
    then fails to remove it and logs so; the test removes both)."""
    made: list[tuple[Any, str]] = []

    def start(driver: DockerDriver) -> Any:
        container = docker_engine.containers.run(
            BUSYBOX,
            ["sleep", "600"],
            detach=True,
            network_mode="none",
            volumes={driver.volume: {"bind": "/w", "mode": "rw"}},
            labels={"marid.test": "observer"},
        )
        made.append((container, driver.volume))
        return container

    yield start
    for container, volume in made:
        container.remove(force=True)
        with contextlib.suppress(NotFound):
            docker_engine.volumes.get(volume).remove(force=True)


def files(observer: Any) -> list[str]:
    code, output = observer.exec_run(["ls", "-a", "/w"])
    assert code == 0
    return sorted(set(output.decode().split()) - {".", ".."})


async def test_jobs_share_the_workspace_and_nothing_else(
    make_driver: Callable[..., DockerDriver], docker_engine: docker.DockerClient
) -> None:
    driver = make_driver()
    build = spec(
        StageSpec(
            "one",
            False,
            [
                JobSpec(
                    "first",
                    "echo written > f; sleep 600 & export FOO=changed ADDED=1; touch /tmp/mine",
                )
            ],
        ),
        StageSpec(
            "two",
            False,
            [
                JobSpec(
                    "second",
                    "cat f; ps -o comm | grep -c sleep || true\n"
                    "echo FOO=$FOO ADDED=${ADDED:-unset}\n"
                    "ls /tmp/mine",
                )
            ],
        ),
        env={"FOO": "bar"},
    )
    recorder = Recorder()

    assert await Execution(build, driver, recorder).run() == "failed"

    assert recorder.status["first"] == ("passed", True)
    lines = recorder.output["second"].splitlines()
    assert "written" in lines  # the first job's file, in the shared workspace
    assert "0" in lines  # no `sleep` of the first job's: the second has its own processes
    assert "FOO=bar ADDED=unset" in lines  # and the build's environment, unchanged
    assert any("/tmp/mine" in line and "No such file" in line for line in lines)  # own rootfs
    assert recorder.status["second"][0] == "failed"  # `ls` of the missing file
    assert containers(docker_engine, driver) == []


async def test_a_failed_job_never_runs_the_held_next_ones(
    make_driver: Callable[..., DockerDriver],
    docker_engine: docker.DockerClient,
    observer: Callable[[DockerDriver], Any],
) -> None:
    driver = make_driver(prepare_ahead=2)
    build = spec(
        StageSpec(
            "test",
            False,
            [JobSpec("fails", f"{GATED}; exit 3"), JobSpec("next", "touch ran-next")],
        ),
        StageSpec("deploy", False, [JobSpec("later", "touch ran-later")]),
    )
    recorder = Recorder()
    running = asyncio.create_task(Execution(build, driver, recorder).run())
    await held(docker_engine, driver, "next", recorder)  # both made and started while `fails` runs
    await held(docker_engine, driver, "later", recorder)
    watcher = observer(driver)
    watcher.exec_run(["touch", "/w/gate"])

    assert await running == "failed"

    assert recorder.status["next"] == ("failed", False)
    assert recorder.status["later"] == ("failed", False)
    assert files(watcher) == ["gate"]  # neither held job ran its commands
    assert containers(docker_engine, driver) == []


async def test_a_kill_during_a_job_removes_the_held_containers_unrun(
    make_driver: Callable[..., DockerDriver],
    docker_engine: docker.DockerClient,
    observer: Callable[[DockerDriver], Any],
) -> None:
    driver = make_driver()
    build = spec(
        StageSpec("test", False, [JobSpec("long", "sleep 600"), JobSpec("next", "touch ran-next")])
    )
    recorder = Recorder()
    execution = Execution(build, driver, recorder)
    running = asyncio.create_task(execution.run())
    await held(docker_engine, driver, "next", recorder)
    watcher = observer(driver)
    await recorder.wait_for("long", "+ sleep 600")

    execution.kill.set()

    assert await running == "killed"
    assert recorder.status["next"] == ("killed", False)
    assert files(watcher) == []
    assert containers(docker_engine, driver) == []


async def test_a_held_jobs_time_limit_counts_from_its_release(
    make_driver: Callable[..., DockerDriver], docker_engine: docker.DockerClient
) -> None:
    """The second job's container is started while the first runs for 4 s: counted from
    then, its 3 s limit would end its 1 s sleep."""
    driver = make_driver()
    build = spec(
        StageSpec(
            "test",
            False,
            [JobSpec("first", "sleep 4"), JobSpec("second", "sleep 1", timeout=3.0)],
        )
    )
    recorder = Recorder()

    assert await Execution(build, driver, recorder).run() == "passed"

    assert recorder.status["second"] == ("passed", True)
    assert containers(docker_engine, driver) == []


async def test_a_job_other_than_the_expected_one_runs_all_the_same(
    make_driver: Callable[..., DockerDriver],
    docker_engine: docker.DockerClient,
    observer: Callable[[DockerDriver], Any],
) -> None:
    """A caller that skips expected jobs (or was told nothing) still gets each job run once;
    the skipped jobs' held containers never run theirs."""
    driver = make_driver()
    await driver.create(Output())
    watcher = observer(driver)
    driver.expect([Upcoming(name, f"touch {name}", {}) for name in ("a", "b", "c")])

    out = Output()
    assert (await driver.run("c", "touch c", {}, out)).status == 0
    assert (await driver.run("d", "ls", {}, out)).status == 0

    assert out.text == "c\n"
    assert files(watcher) == ["c"]
    await driver.destroy()
    assert containers(docker_engine, driver) == []


async def test_without_prepare_ahead_each_container_is_made_when_its_job_is_due(
    make_driver: Callable[..., DockerDriver], docker_engine: docker.DockerClient
) -> None:
    driver = make_driver(prepare_ahead=0)
    await driver.create(Output())
    script = f"echo started; {GATED}"
    driver.expect([Upcoming(name, script, {}) for name in ("a", "b")])
    out = Output()
    first = asyncio.create_task(driver.run("a", script, {}, out))
    await out.wait_for("started")

    assert [c["Labels"]["marid.job"] for c in containers(docker_engine, driver)] == ["a"]
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_docker_network_none_is_loopback_only_with_localhost(
    make_driver: Callable[..., DockerDriver],
) -> None:
    driver = make_driver()
    await driver.create(Output())
    out = Output()

    script = "tail -n +3 /proc/net/dev | cut -d: -f1; grep -c localhost /etc/hosts"
    assert (await driver.run("net", script, {}, out)).status == 0

    assert out.text.split() == ["lo", "2"]


async def test_crun_is_the_runtime_when_none_is_set_and_the_engine_has_it(
    make_driver: Callable[..., DockerDriver], docker_engine: docker.DockerClient
) -> None:
    runtimes = docker_engine.info()["Runtimes"]
    driver = make_driver()
    await driver.create(Output())
    job = asyncio.create_task(driver.run("a", GATED, {}, Output()))
    container = await held(docker_engine, driver, "a")

    expected = "crun" if "crun" in runtimes else "runc"
    assert container.attrs["HostConfig"]["Runtime"] == expected
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
