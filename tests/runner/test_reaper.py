"""The runner's reaper (runner/reaper.py, docs/configuration.md §1.3 `reaper`): containers and
volumes of builds no longer running go, a running build's and other installations' stay;
old temporary directories go. The real engine, real PostgreSQL, real directories."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import os
import random
import re
import secrets
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import docker
import pytest
from docker.errors import DockerException

from marid.blobs import FsStore
from marid.config import Config
from marid.runner import reaper
from marid.runner.drivers.docker import LABEL_ATTEMPT, LABEL_BUILD, LABEL_INSTANCE
from marid.users import User
from tests.runner.conftest import BUSYBOX, DEFAULT_HOST

GRACE = 3600.0
LABEL_TEST = "marid.test"  # only on what this module makes, so teardown finds all of it
# Random, so containers left by an interrupted earlier session never match this one's builds.
_build_ids = itertools.count(random.randrange(10**6, 10**9, 1000))
_numbers = itertools.count(1)


def runner_config(config: Config, drivers: list[str], host: str | None = None) -> Config:
    docker_host = host or os.environ.get("DOCKER_HOST", DEFAULT_HOST)
    return dataclasses.replace(
        config,
        drivers=drivers,
        docker=dataclasses.replace(config.docker, host=docker_host),
        reaper=dataclasses.replace(config.reaper, grace=GRACE),
    )


async def add_build(
    pool: asyncpg.Pool, owner: User, status: str, attempt: int, lease: timedelta
) -> int:
    """A build row with its queue state, its lease ending `lease` from now (database clock)."""
    build_id = next(_build_ids)
    await pool.execute(
        """
        INSERT INTO builds (id, user_id, author_id, number, manifest, driver, status, attempt,
                            lease_expires_at, timeout_seconds)
        VALUES ($1, $2, $2, $6, 'image: x', 'docker', $3, $4, now() + $5, 60)
        """,
        build_id,
        owner.id,
        status,
        attempt,
        lease,
        next(_numbers),
    )
    return build_id


@pytest.fixture
def engine(docker_engine: docker.DockerClient) -> Iterator[Engine]:
    made = Engine(docker_engine, secrets.token_hex(6))
    yield made
    made.remove_all()


class Engine:
    """Containers and volumes labelled as runner/drivers/docker.py labels a build's."""

    def __init__(self, client: docker.DockerClient, test_id: str) -> None:
        self.client = client
        self.test_id = test_id

    def leftovers(self, build_id: int, attempt: int, instance: str) -> tuple[str, str]:
        """A running job container and the workspace volume it mounts: (container id,
        volume name)."""
        labels = {
            LABEL_BUILD: str(build_id),
            LABEL_ATTEMPT: str(attempt),
            LABEL_INSTANCE: instance,
            LABEL_TEST: self.test_id,
        }
        volume = self.client.volumes.create(f"marid-test-{secrets.token_hex(6)}", labels=labels)
        container = self.client.containers.run(
            BUSYBOX,
            ["sleep", "600"],
            detach=True,
            labels=labels,
            volumes={volume.name: {"bind": "/work", "mode": "rw"}},
        )
        return container.id, volume.name

    def networked(self, build_id: int, attempt: int, instance: str) -> tuple[str, str]:
        """A build's own network (docker.network build) with a running job container on it:
        (container id, network id)."""
        labels = {
            LABEL_BUILD: str(build_id),
            LABEL_ATTEMPT: str(attempt),
            LABEL_INSTANCE: instance,
            LABEL_TEST: self.test_id,
        }
        network = self.client.networks.create(
            f"marid-test-{secrets.token_hex(6)}", driver="bridge", labels=labels
        )
        container = self.client.containers.run(
            BUSYBOX, ["sleep", "600"], detach=True, labels=labels, network=network.name
        )
        return container.id, network.id

    def present(self) -> set[str]:
        """Ids of this test's containers and networks and names of its volumes still on the
        engine."""
        filters = {"label": [f"{LABEL_TEST}={self.test_id}"]}
        containers = self.client.containers.list(all=True, filters=filters)
        volumes = self.client.volumes.list(filters=filters)
        networks = self.client.networks.list(filters=filters)
        return {c.id for c in containers} | {v.name for v in volumes} | {n.id for n in networks}

    def remove_all(self) -> None:
        filters = {"label": [f"{LABEL_TEST}={self.test_id}"]}
        for container in self.client.containers.list(all=True, filters=filters):
            container.remove(force=True)
        for volume in self.client.volumes.list(filters=filters):
            volume.remove(force=True)
        for network in self.client.networks.list(filters=filters):
            network.remove()


@pytest.mark.docker
async def test_a_killed_builds_containers_and_volumes_go_running_and_foreign_ones_stay(
    config: Config, pool: asyncpg.Pool, alice: User, engine: Engine, tmp_path: Path
):
    instance = secrets.token_hex(8)
    killed = await add_build(
        pool, alice, "killed", 1, -timedelta(minutes=1)
    )  # DELETEd, runner dead
    dead = await add_build(
        pool, alice, "running", 1, -timedelta(seconds=5)
    )  # runner died, not requeued
    running = await add_build(pool, alice, "running", 2, timedelta(hours=1))
    queued = await add_build(pool, alice, "queued", 1, timedelta(0))  # requeued
    gone = {
        *engine.leftovers(killed, 1, instance),
        *engine.leftovers(dead, 1, instance),
        *engine.leftovers(running, 1, instance),  # the first attempt of a running build
        *engine.leftovers(queued, 1, instance),
        *engine.leftovers(next(_build_ids), 1, instance),  # its row is gone
    }
    kept = {
        *engine.leftovers(running, 2, instance),
        *engine.leftovers(killed, 1, secrets.token_hex(8)),  # another installation's build
        *engine.leftovers(killed, 1, ""),  # `marid run`, which has no installation
    }
    sweeper = reaper.RunnerReaper(
        runner_config(config, ["docker"]), pool, FsStore(tmp_path / "blobs"), instance, tmp_path
    )
    try:
        reaped = await sweeper.tick(datetime.now(UTC))
    finally:
        sweeper.close()
    assert (reaped.containers, reaped.volumes) == (5, 5)
    assert engine.present() == kept and len(gone) == 10


@pytest.mark.docker
async def test_the_networks_of_dead_attempts_go_after_their_containers(
    config: Config,
    pool: asyncpg.Pool,
    alice: User,
    engine: Engine,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    instance = secrets.token_hex(8)
    killed = await add_build(pool, alice, "killed", 1, -timedelta(minutes=1))
    running = await add_build(pool, alice, "running", 2, timedelta(hours=1))
    gone = {*engine.networked(killed, 1, instance), *engine.networked(running, 1, instance)}
    kept = {
        *engine.networked(running, 2, instance),
        *engine.networked(killed, 1, secrets.token_hex(8)),  # another installation's build
    }
    sweeper = reaper.RunnerReaper(
        runner_config(config, ["docker"]), pool, FsStore(tmp_path / "blobs"), instance, tmp_path
    )
    try:
        with caplog.at_level("INFO", logger="marid.runner.reaper"):
            reaped = await sweeper.tick(datetime.now(UTC))
    finally:
        sweeper.close()
    assert (reaped.containers, reaped.volumes) == (2, 0)
    assert engine.present() == kept and len(gone) == 4
    assert "runner reaper removed 2 networks" in caplog.messages


# docker-py leaves the socket of a refused connection to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_an_engine_that_is_away_fails_the_sweep_after_the_files(
    config: Config, pool: asyncpg.Pool, tmp_path: Path
):
    old = tmp_path / "marid-workspace-abc123"
    old.mkdir()
    backdate(old, timedelta(days=1))
    away = runner_config(config, ["docker"], host=f"unix://{tmp_path}/no-engine.sock")
    sweeper = reaper.RunnerReaper(away, pool, FsStore(tmp_path / "blobs"), "inst", tmp_path)
    try:
        with pytest.raises(DockerException) as raised:
            await sweeper.tick(datetime.now(UTC))
    finally:
        sweeper.close()
    assert not old.exists()
    # The socket lives in the frames of the exception's chain: let it go now, under this
    # test's warning filter.
    error: BaseException | None = raised.value
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()


def backdate(path: Path, age: timedelta, now: datetime | None = None) -> None:
    when = ((now or datetime.now(UTC)) - age).timestamp()
    os.utime(path, (when, when), follow_symlinks=False)


async def test_temporary_directories_go_once_no_build_can_still_use_them(
    config: Config, pool: asyncpg.Pool, alice: User, tmp_path: Path
):
    temp = tmp_path / "tmp"
    temp.mkdir()
    config = runner_config(config, ["os"])
    longest = timedelta(seconds=GRACE + config.builds.max_timeout)
    now = datetime.now(UTC)
    made = {}
    for name, age in [
        ("marid-workspace-old", longest + timedelta(minutes=1)),
        ("marid-artifact-old", longest + timedelta(minutes=1)),
        ("marid-object-young", longest - timedelta(minutes=1)),
        ("unrelated-old", longest * 2),
    ]:
        made[name] = temp / name
        made[name].mkdir()
        (made[name] / "file").write_text("x")
        backdate(made[name], age, now)
    # A symbolic link is never followed, even with a matching name.
    target = tmp_path / "elsewhere"
    target.mkdir()
    (temp / "marid-image-link").symlink_to(target)
    backdate(temp / "marid-image-link", longest * 2, now)

    sweeper = reaper.RunnerReaper(config, pool, FsStore(tmp_path / "blobs"), "inst", temp)
    reaped = await sweeper.tick(now)
    assert reaped.files == 2
    assert sorted(p.name for p in temp.iterdir()) == [
        "marid-image-link",
        "marid-object-young",
        "unrelated-old",
    ]
    assert target.exists()

    # A running build with a longer time limit than builds.max_timeout (set before the
    # limit was lowered) may still use a directory that old.
    build_id = await add_build(pool, alice, "running", 1, timedelta(hours=1))
    await pool.execute("UPDATE builds SET timeout_seconds = $2 WHERE id = $1", build_id, 86400.0)
    reaped = await sweeper.tick(now + timedelta(minutes=2))
    assert reaped.files == 0 and (temp / "marid-object-young").exists()


def test_the_reaper_knows_every_temporary_directory_the_runner_makes():
    runner_source = Path(reaper.__file__).parent
    prefixes = {
        match
        for path in runner_source.rglob("*.py")
        for match in re.findall(r"""prefix=["'](marid-[a-z-]+)["']""", path.read_text())
    }
    assert prefixes and prefixes <= set(reaper.RUNNER_DIRS)


async def test_run_sweeps_at_start_and_stops_when_told(
    config: Config, pool: asyncpg.Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    temp = tmp_path / "tmp"
    (temp / "marid-scripts-old").mkdir(parents=True)
    backdate(temp / "marid-scripts-old", timedelta(days=2))
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
    stop = asyncio.Event()
    store = FsStore(tmp_path / "blobs")
    running = asyncio.create_task(reaper.run(runner_config(config, ["os"]), pool, store, "i", stop))
    async with asyncio.timeout(30):
        while (temp / "marid-scripts-old").exists():  # noqa: ASYNC110 - a file, no event
            await asyncio.sleep(0.05)
    stop.set()
    await running  # returns, without an exception


def test_an_empty_instance_is_refused(config: Config, tmp_path: Path):
    with pytest.raises(ValueError, match="instance label"):
        reaper.RunnerReaper(config, None, FsStore(tmp_path), "")  # type: ignore[arg-type]
