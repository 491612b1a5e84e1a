"""The docker driver against the real engine (docs/manifest.md §9.2, docs/manifest.md §6)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import itertools
import json
import random
import shutil
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import ImageNotFound

from marid.runner.drivers.base import DriverError, Exit, Limits, SshKey
from marid.runner.drivers.docker import (
    CACHE_REPOSITORY,
    LABEL_BUILD,
    DockerDriver,
    UploadedImage,
    remove_leftovers,
)
from tests.runner.conftest import BUSYBOX, Gate, GatedClient

pytestmark = pytest.mark.docker

WORKSPACE = "/work"
LIMITS = Limits(memory=64 * 1024**2, cpus=1.0, pids=64)
# Random, so containers left by an interrupted earlier session never match this one's builds.
_build_ids = itertools.count(random.randrange(10**6, 10**9, 1000))

Uploaded = Callable[[str], Awaitable[UploadedImage | None]]
MakeDriver = Callable[..., DockerDriver]


class Output:
    """An output sink recording each chunk with the time it arrived."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self._changed = asyncio.Event()

    async def __call__(self, chunk: bytes) -> None:
        self.chunks.append((time.monotonic(), chunk))
        self._changed.set()

    async def wait_for(self, text: str) -> None:
        """Return once the output holds `text`."""
        async with asyncio.timeout(10):
            while text not in self.text:
                self._changed.clear()
                await self._changed.wait()

    @property
    def text(self) -> str:
        return b"".join(chunk for _, chunk in self.chunks).decode()

    def arrival(self, text: str) -> float:
        """When the output first held `text`."""
        seen = b""
        for at, chunk in self.chunks:
            seen += chunk
            if text.encode() in seen:
                return at
        raise AssertionError(f"{text!r} not in {seen!r}")


async def nothing_uploaded(name: str) -> UploadedImage | None:
    return None


@pytest.fixture
async def make_driver(docker_engine: docker.DockerClient) -> AsyncIterator[MakeDriver]:
    """`make_driver(image=..., limits=..., uploaded=...)` -> a driver for a new build id;
    every driver made is destroyed afterwards."""
    drivers: list[DockerDriver] = []

    def make(
        image: str = BUSYBOX,
        limits: Limits = LIMITS,
        uploaded: Uploaded = nothing_uploaded,
        workspace: str = WORKSPACE,
    ) -> DockerDriver:
        driver = DockerDriver(
            docker_engine,
            build_id=next(_build_ids),
            attempt=1,
            image=image,
            workspace=workspace,
            limits=limits,
            network="none",
            pull="never",
            uploaded=uploaded,
        )
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        await driver.destroy()


@pytest.fixture
async def driver(make_driver: MakeDriver) -> DockerDriver:
    """A created driver for the busybox image."""
    driver = make_driver()
    await driver.create(Output())
    return driver


async def run(driver: DockerDriver, script: str, env: dict[str, str] | None = None) -> Output:
    """Run `script` as a job that must pass; returns its output."""
    out = Output()
    status = await driver.run("test", script, env or {}, out)
    assert status == Exit(0), out.text
    return out


def labelled(client: docker.DockerClient, build_id: int) -> list[str]:
    """Names of the containers and volumes labelled for `build_id`."""
    filters = {"label": f"{LABEL_BUILD}={build_id}"}
    containers = client.containers.list(all=True, filters=filters)
    volumes = client.volumes.list(filters=filters)
    return [item.name for item in (*containers, *volumes)]


# --- run -------------------------------------------------------------------------------------


async def gated(driver: DockerDriver, before: str, after: str, out: Output, tmp: Path) -> Exit:
    """Run a job that prints `before`, waits until the test opens a gate (a file it places in
    the workspace), then prints `after`. `before` must reach `out` while the job waits: a
    driver that passed output on only at the end would never let the test open the gate."""
    gate = f"{WORKSPACE}/gate"
    script = f"{before}; until [ -e {gate} ]; do sleep 0.05; done; {after}"
    job = asyncio.create_task(driver.run("gated", script, {}, out))
    await out.wait_for(before.split("'")[1])
    assert not job.done()
    (tmp / "gate").write_bytes(b"")
    await driver.place_object(tmp / "gate", gate)
    return await asyncio.wait_for(job, timeout=60)


async def test_output_is_streamed_while_the_job_runs(driver: DockerDriver, tmp_path: Path) -> None:
    out = Output()
    assert await gated(driver, "echo 'first'", "echo second", out, tmp_path) == Exit(0)
    assert out.text == "first\nsecond\n"


async def test_partial_lines_are_streamed_too(driver: DockerDriver, tmp_path: Path) -> None:
    out = Output()
    assert await gated(driver, "printf 'no line break'", "echo .", out, tmp_path) == Exit(0)
    assert out.text == "no line break.\n"


async def test_run_returns_the_exit_status(driver: DockerDriver) -> None:
    out = Output()

    assert await driver.run("fails", "echo to stderr >&2; exit 3", {}, out) == Exit(
        3, "exit status 3"
    )
    assert out.text == "to stderr\n"  # stderr is merged into the output
    assert await driver.run("passes", "true", {}, Output()) == Exit(0)


async def test_env_is_passed_literally(driver: DockerDriver) -> None:
    env = {"GREETING": "hello world", "EQUATION": "a=b", "DOLLAR": "$HOME"}
    out = await run(driver, 'printf "%s|%s|%s" "$GREETING" "$EQUATION" "$DOLLAR"', env)

    assert out.text == "hello world|a=b|$HOME"


async def test_jobs_run_in_the_workspace_and_share_its_volume(driver: DockerDriver) -> None:
    first = await run(driver, "pwd; hostname; echo kept > file.txt")
    second = await run(driver, "hostname; cat file.txt")

    directory, host_one = first.text.splitlines()
    host_two, content = second.text.splitlines()
    assert directory == WORKSPACE
    assert host_one != host_two  # a new container per job
    assert content == "kept"


async def test_jobs_run_as_the_image_user_with_an_init(driver: DockerDriver) -> None:
    script = "id -u; tr '\\0' ' ' < /proc/1/cmdline; echo; tr '\\0' ' ' < /proc/$$/cmdline"
    out = await run(driver, script)

    # Small scripts reach /bin/sh as `-c SCRIPT` (no copy into the container): the held shell,
    # the init's child, became that shell.
    uid, init, *_ = out.text.splitlines()
    assert uid == "0"
    assert init.startswith("/sbin/docker-init -- /bin/sh -c ")
    assert out.text.endswith(f"\n/bin/sh -c {script}\n ")
    assert (await run(driver, "echo $PPID")).text == "1\n"


async def test_large_scripts_are_copied_into_the_container(driver: DockerDriver) -> None:
    padding = "# " + "x" * 70 * 1024 + "\n"  # over INLINE_SCRIPT_MAX
    out = await run(driver, padding + "tr '\\0' ' ' < /proc/$$/cmdline")

    assert out.text == "/bin/sh /.marid/job.sh "


async def test_limits_are_set_on_the_job_container(
    driver: DockerDriver, docker_engine: docker.DockerClient
) -> None:
    await run(driver, "true")

    (container,) = docker_engine.containers.list(
        all=True, filters={"label": [f"{LABEL_BUILD}={driver.build_id}", "marid.job=test"]}
    )
    host = container.attrs["HostConfig"]
    assert (host["Memory"], host["MemorySwap"]) == (LIMITS.memory, LIMITS.memory)
    assert (host["NanoCpus"], host["PidsLimit"]) == (10**9, LIMITS.pids)
    assert host["NetworkMode"] == "none"


async def test_memory_limit_kills_a_memory_hog(make_driver: MakeDriver) -> None:
    driver = make_driver(limits=Limits(memory=16 * 1024**2, cpus=1.0, pids=64))
    await driver.create(Output())
    out = Output()

    # dd fills a 64 MiB buffer: four times the limit, and no swap to spill into.
    status = await driver.run("hog", "set -e; dd if=/dev/zero of=/dev/null bs=64M count=1", {}, out)

    assert status.status != 0
    assert "Killed" in out.text


async def test_pids_limit_stops_a_fork_bomb(make_driver: MakeDriver) -> None:
    driver = make_driver(limits=Limits(memory=64 * 1024**2, cpus=1.0, pids=8))
    await driver.create(Output())
    out = Output()

    script = "i=0; while [ $i -lt 50 ]; do sleep 3600 & i=$((i + 1)); done; echo all started"
    # The background sleeps die with the container when the shell ends: no hour-long wait.
    status = await asyncio.wait_for(driver.run("forks", script, {}, out), timeout=120)

    assert status.status != 0
    assert "can't fork" in out.text
    assert "all started" not in out.text


async def test_stop_ends_a_running_job_promptly(driver: DockerDriver) -> None:
    out = Output()
    job = asyncio.create_task(driver.run("sleeps", "echo started; sleep 60", {}, out))
    await out.wait_for("started")

    await asyncio.gather(driver.stop(), driver.stop())  # concurrent calls are fine
    status = await asyncio.wait_for(job, timeout=5)

    # SIGTERM reached the shell: it was not the SIGKILL 10 s later. The engine says why the
    # job ended (a kill or a time limit), not the driver.
    assert status == Exit(128 + 15, "terminated by signal 15 (SIGTERM)")
    await driver.stop()  # idempotent


async def test_no_job_starts_after_stop(driver: DockerDriver) -> None:
    await driver.stop()
    out = Output()

    assert (await driver.run("late", "echo ran", {}, out)).status == 137
    assert out.text == ""


@pytest.fixture
async def gated_driver(docker_engine: docker.DockerClient) -> AsyncIterator[Callable[..., Any]]:
    """`gated_driver(gate)` -> a driver whose engine calls pass `gate`; destroyed afterwards."""
    made: list[tuple[Gate, DockerDriver]] = []

    def make(gate: Gate) -> DockerDriver:
        client = GatedClient(gate)
        driver = DockerDriver(
            client, next(_build_ids), 1, BUSYBOX, WORKSPACE, LIMITS, "none", "never",
            nothing_uploaded,
        )  # fmt: skip
        made.append((gate, driver))
        return driver

    yield make
    for gate, driver in made:
        gate.release()
        await driver.destroy()
        driver._client.close()


async def test_a_stop_while_the_container_is_made_keeps_the_job_from_starting(
    gated_driver: Callable[[Gate], DockerDriver], docker_engine: docker.DockerClient
) -> None:
    gate = Gate("created")
    driver = gated_driver(gate)
    await driver.create(Output())
    out = Output()
    job = asyncio.create_task(driver.run("late", "echo ran", {}, out))
    await gate.wait()

    await driver.stop()
    gate.release()

    assert (await job).status == 137
    assert out.text == ""
    (container,) = docker_engine.containers.list(
        all=True, filters={"label": f"{LABEL_BUILD}={driver.build_id}"}
    )
    assert container.status == "created"  # never started


async def test_destroy_waits_for_a_container_whose_caller_was_cancelled(
    gated_driver: Callable[[Gate], DockerDriver], docker_engine: docker.DockerClient
) -> None:
    """A kill or timeout cancels the job's task while the engine makes its container: the
    container appears after the cancellation, and destroy() removes it all the same."""
    gate = Gate("container")
    driver = gated_driver(gate)
    await driver.create(Output())
    job = asyncio.create_task(driver.run("late", "echo ran", {}, Output()))
    await gate.wait()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job

    destroying = asyncio.create_task(driver.destroy())
    done, _ = await asyncio.wait({destroying}, timeout=0.5)
    assert not done  # waiting for the container the engine is still making
    gate.release()
    await destroying

    assert labelled(docker_engine, driver.build_id) == []


async def test_a_container_that_cannot_be_created_is_a_driver_error(
    make_driver: MakeDriver,
) -> None:
    driver = make_driver(limits=Limits(memory=1024**2, cpus=1.0, pids=64))  # below the 6 MiB floor
    await driver.create(Output())

    with pytest.raises(DriverError, match="Minimum memory limit allowed is 6MB"):
        await driver.run("tiny", "true", {}, Output())


async def test_a_container_that_cannot_be_started_is_a_driver_error(
    make_driver: MakeDriver,
) -> None:
    driver = make_driver(workspace="/etc/passwd")  # a file: the volume cannot be mounted there
    await driver.create(Output())

    with pytest.raises(DriverError, match="not a directory"):
        await driver.run("unmountable", "true", {}, Output())


# --- how a job ended (docs/manifest.md §6.8) -------------------------------------------------


def job_container(client: docker.DockerClient, driver: DockerDriver, job: str) -> Any:
    """The container the driver runs `job` in, found by the labels it sets."""
    labels = [f"{LABEL_BUILD}={driver.build_id}", f"marid.job={job}"]
    (container,) = client.containers.list(all=True, filters={"label": labels})
    return container


@pytest.mark.parametrize(
    ("act", "ending"),
    [
        (lambda c: c.kill(), Exit(137, "killed by signal 9 (SIGKILL)")),
        (lambda c: c.kill(signal="TERM"), Exit(143, "terminated by signal 15 (SIGTERM)")),
        (lambda c: c.stop(), Exit(143, "container stopped from outside (exit 143)")),
        (lambda c: c.remove(force=True), Exit(None, "container removed by someone else")),
    ],
    ids=["docker-kill", "docker-kill-TERM", "docker-stop", "docker-rm-f"],
)
async def test_a_container_ended_from_outside_says_how(
    driver: DockerDriver,
    docker_engine: docker.DockerClient,
    act: Callable[[Any], None],
    ending: Exit,
) -> None:
    out = Output()
    job = asyncio.create_task(driver.run("victim", "echo ready; sleep 60", {}, out))
    await out.wait_for("ready")

    await asyncio.to_thread(act, job_container(docker_engine, driver, "victim"))

    assert await asyncio.wait_for(job, timeout=60) == ending
    assert out.text == "ready\n"


async def test_out_of_memory_is_the_reason_with_the_limit(
    make_driver: MakeDriver, tmp_path: Path
) -> None:
    driver = make_driver(limits=Limits(memory=32 * 1024**2, cpus=1.0, pids=64))
    await driver.create(Output())
    out = Output()

    # dd fills a 64 MiB buffer: twice the limit, and no swap to spill into. It starts once the
    # test opens the gate, after the engine's start call: Docker 20.10 watches a container for
    # out-of-memory kills only from then on.
    hog = "dd if=/dev/zero of=/dev/null bs=64M count=1"
    ending = await gated(driver, "echo 'ready'", hog, out, tmp_path)

    # The shell reports its killed command and returns 128 + 9; the engine saw why.
    assert ending == Exit(137, "out of memory (limit 32m)")
    assert out.text == "ready\nKilled\n"


async def test_a_shell_killed_from_inside_reports_the_signal(driver: DockerDriver) -> None:
    """No engine call stopped it: the exit status 128 + 9 alone says what happened."""
    out = Output()

    assert await driver.run("self", "echo ready; kill -9 $$", {}, out) == Exit(
        137, "killed by signal 9 (SIGKILL)"
    )
    assert out.text == "ready\n"


async def test_nothing_is_collected_from_a_removed_container(
    driver: DockerDriver, docker_engine: docker.DockerClient, tmp_path: Path
) -> None:
    out = Output()
    job = asyncio.create_task(
        driver.run("victim", "echo ready > file; cat file; sleep 60", {}, out)
    )
    await out.wait_for("ready")
    await asyncio.to_thread(job_container(docker_engine, driver, "victim").remove, force=True)
    assert (await asyncio.wait_for(job, timeout=60)).reason == "container removed by someone else"

    with pytest.raises(DriverError, match="file: no job container to collect from"):
        await driver.collect("file", tmp_path / "artifact", max_size=1024)


# --- objects and keys ------------------------------------------------------------------------


async def test_objects_are_placed_in_the_volume_or_in_every_job(
    driver: DockerDriver, tmp_path: Path
) -> None:
    content = tmp_path / "object"
    content.write_bytes(b"object content\n")

    relative = await driver.place_object(content, "deep/er/object.txt")
    absolute = await driver.place_object(content, "/etc/marid/object.txt")
    inside = await driver.place_object(content, f"{WORKSPACE}/sub/../top.txt")
    stat = "stat -c '%a %n' deep/er deep/er/object.txt top.txt /etc/marid/object.txt"
    first = await run(driver, f"{stat}; echo changed > deep/er/object.txt")
    second = await run(driver, "cat deep/er/object.txt /etc/marid/object.txt")

    assert (relative, absolute, inside) == (
        f"{WORKSPACE}/deep/er/object.txt",
        "/etc/marid/object.txt",
        f"{WORKSPACE}/top.txt",
    )
    assert first.text.splitlines() == [
        "755 deep/er",  # missing parents are created
        "644 deep/er/object.txt",
        "644 top.txt",
        "644 /etc/marid/object.txt",
    ]
    # The volume copy was written once; the absolute one is fresh in every container.
    assert second.text == "changed\nobject content\n"


async def test_an_object_that_cannot_be_placed_is_a_driver_error(
    driver: DockerDriver, tmp_path: Path
) -> None:
    content = tmp_path / "object"
    content.write_bytes(b"x")

    with pytest.raises(DriverError, match="not a directory"):
        await driver.place_object(content, "/etc/passwd/object.txt")


async def test_keys_and_ssh_config_are_written_with_mode_0600(driver: DockerDriver) -> None:
    keys = [
        SshKey("zeta", "ZETA KEY\n", "Host zeta\n  IdentityFile /root/.ssh/zeta"),
        SshKey("alpha", "ALPHA KEY\n", "Host alpha\n  IdentityFile /root/.ssh/alpha"),
    ]

    locations = await driver.write_keys(keys)
    modes = await run(driver, "stat -c '%a %n' /root/.ssh/alpha /root/.ssh/zeta /root/.ssh/config")
    config = await run(driver, "cat /root/.ssh/config")
    key = await run(driver, "cat /root/.ssh/zeta")

    assert locations == {"alpha": "/root/.ssh/alpha", "zeta": "/root/.ssh/zeta"}
    assert modes.text.splitlines() == [
        "600 /root/.ssh/alpha",
        "600 /root/.ssh/zeta",
        "600 /root/.ssh/config",
    ]
    assert config.text == (
        "\nStrictHostKeyChecking no\nUserKnownHostsFile /dev/null\n\n"
        "Host alpha\n  IdentityFile /root/.ssh/alpha\n"
        "Host zeta\n  IdentityFile /root/.ssh/zeta\n"
    )
    assert key.text == "ZETA KEY\n"


async def test_no_keys_write_nothing(driver: DockerDriver) -> None:
    assert await driver.write_keys([]) == {}
    assert (await run(driver, "ls -a /root")).text == ".\n..\n"


# --- artifacts -------------------------------------------------------------------------------

MAKE_ARTIFACTS = """
mkdir -p out/dir
printf relative > out/file.txt
printf absolute > /tmp/absolute.txt
ln -s out/file.txt link
head -c 2049 /dev/zero > big
"""


async def test_artifacts_are_collected_from_the_last_job(
    driver: DockerDriver, tmp_path: Path
) -> None:
    await run(driver, MAKE_ARTIFACTS)

    for source, expected in [
        ("out/file.txt", b"relative"),
        ("/tmp/absolute.txt", b"absolute"),
        (f"{WORKSPACE}/out/file.txt", b"relative"),
        ("link", b"relative"),  # a symlink is followed
        ("big", b"\0" * 2049),  # exactly the limit
    ]:
        destination = tmp_path / "artifact"
        await driver.collect(source, destination, max_size=2049)
        assert destination.read_bytes() == expected, source


async def test_collect_refuses_missing_files_directories_and_large_files(
    driver: DockerDriver, tmp_path: Path
) -> None:
    await run(driver, MAKE_ARTIFACTS)
    destination = tmp_path / "artifact"

    for source, reason in [
        ("missing.txt", "missing.txt: no such file"),
        ("/nowhere/file", "/nowhere/file: no such file"),
        ("out/dir", "out/dir: is a directory"),
        ("out", "out: is a directory"),
        ("big", "big exceeds the maximum artifact size of 2048 bytes"),
    ]:
        with pytest.raises(DriverError) as raised:
            await driver.collect(source, destination, max_size=2048)
        assert str(raised.value) == reason
        assert not destination.exists()


async def test_collect_before_any_job_is_a_driver_error(
    driver: DockerDriver, tmp_path: Path
) -> None:
    with pytest.raises(DriverError, match="no job container"):
        await driver.collect("file", tmp_path / "artifact", max_size=1024)


# --- image resolution ------------------------------------------------------------------------


@pytest.fixture
def saved_image(docker_engine: docker.DockerClient, tmp_path: Path) -> tuple[str, Path]:
    """(name, `docker save` archive) of busybox tagged with a name the engine does not have."""
    repository = f"marid-test/uploaded-{random.randrange(10**9)}"
    image = docker_engine.images.get(BUSYBOX)
    image.tag(repository, "v1")
    archive = tmp_path / "image.tar"
    try:
        _save(docker_engine, f"{repository}:v1", archive)
    finally:
        docker_engine.images.remove(f"{repository}:v1")
    return f"{repository}:v1", archive


class Uploads:
    """An `uploaded` callable offering one archive under one name, counting fetches."""

    def __init__(self, name: str, archive: Path, digest: str | None = None) -> None:
        self.name, self.archive = name, archive
        self.digest = digest or hashlib.sha256(archive.read_bytes()).hexdigest()
        self.fetches = 0

    async def __call__(self, name: str) -> UploadedImage | None:
        return UploadedImage(self.digest, self.fetch) if name == self.name else None

    async def fetch(self, path: Path) -> None:
        self.fetches += 1
        shutil.copyfile(self.archive, path)


@pytest.fixture
def uncache(docker_engine: docker.DockerClient) -> Iterator[list[str]]:
    """Collects digests whose cache tags are removed after the test (the next run loads again)."""
    digests: list[str] = []
    yield digests
    for digest in digests:
        with contextlib.suppress(ImageNotFound):
            docker_engine.images.remove(f"{CACHE_REPOSITORY}:{digest}")


async def test_an_uploaded_image_is_loaded_once_and_reused(
    make_driver: MakeDriver,
    docker_engine: docker.DockerClient,
    saved_image: tuple[str, Path],
    uncache: list[str],
) -> None:
    name, archive = saved_image
    uploads = Uploads(name, archive)
    uncache.append(uploads.digest)
    first, second = (
        make_driver(image=name, uploaded=uploads),
        make_driver(image=name, uploaded=uploads),
    )
    first_out, second_out = Output(), Output()

    await first.create(first_out)
    ran = await run(first, "echo from the upload")
    await second.create(second_out)

    assert uploads.fetches == 1
    assert first_out.text.startswith(f"Loading uploaded image {name} (sha256:{uploads.digest})\n")
    assert second_out.text.startswith(f"Using uploaded image {name} (sha256:")
    assert ran.text == "from the upload\n"
    # The archive's own tag was dropped: an upload never re-points a name in the engine.
    with pytest.raises(ImageNotFound):
        docker_engine.images.get(name)


def _save(client: docker.DockerClient, name: str, archive: Path) -> None:
    """`docker save name > archive` (RepoTags = [name])."""
    with archive.open("wb") as file:
        for chunk in client.images.get(name).save(named=name):
            file.write(chunk)


def _merge(archives: list[Path], target: Path) -> None:
    """One `docker save` archive holding the images of all `archives`."""
    manifest: list[Any] = []
    seen: set[str] = set()
    with tarfile.open(target, "w") as merged:
        for archive in archives:
            with tarfile.open(archive) as tar:
                for member in tar:
                    if member.name == "manifest.json":
                        manifest += json.load(tar.extractfile(member))  # type: ignore[arg-type]
                    elif member.name not in seen:
                        seen.add(member.name)
                        merged.addfile(member, tar.extractfile(member))
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        merged.addfile(info, io.BytesIO(data))


@pytest.fixture
def two_image_archive(
    docker_engine: docker.DockerClient, saved_image: tuple[str, Path], tmp_path: Path
) -> tuple[str, str, Path]:
    """(busybox's name, another image's name, an archive of both); neither name is in the engine."""
    name, busybox = saved_image
    other = f"marid-test/other-{random.randrange(10**9)}:1"
    root = io.BytesIO()
    with tarfile.open(fileobj=root, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        tar.addfile(info, io.BytesIO())
    repository, tag = other.split(":")
    docker_engine.api.import_image_from_data(root.getvalue(), repository=repository, tag=tag)
    try:
        _save(docker_engine, other, tmp_path / "other.tar")
    finally:
        docker_engine.images.remove(other)
    _merge([busybox, tmp_path / "other.tar"], tmp_path / "both.tar")
    return name, other, tmp_path / "both.tar"


async def test_an_archive_of_several_images_provides_the_one_named_like_the_image(
    make_driver: MakeDriver,
    docker_engine: docker.DockerClient,
    two_image_archive: tuple[str, str, Path],
    uncache: list[str],
) -> None:
    name, other, archive = two_image_archive
    uploads = Uploads(name, archive)
    uncache.append(uploads.digest)
    driver = make_driver(image=name, uploaded=uploads)

    await driver.create(Output())

    assert (await run(driver, "echo busybox")).text == "busybox\n"
    with pytest.raises(ImageNotFound):
        docker_engine.images.get(other)


async def test_an_archive_of_several_images_without_the_name_is_refused(
    make_driver: MakeDriver, two_image_archive: tuple[str, str, Path]
) -> None:
    _, _, archive = two_image_archive
    driver = make_driver(
        image="marid-test/neither:1", uploaded=Uploads("marid-test/neither:1", archive)
    )

    with pytest.raises(DriverError) as raised:
        await driver.create(Output())

    assert str(raised.value) == (
        "uploaded image marid-test/neither:1: the archive does not hold exactly one image"
        " tagged marid-test/neither:1"
    )


async def test_an_uploaded_image_must_match_its_digest(
    make_driver: MakeDriver, saved_image: tuple[str, Path]
) -> None:
    name, archive = saved_image
    uploads = Uploads(name, archive, digest="0" * 64)
    driver = make_driver(image=name, uploaded=uploads)

    with pytest.raises(DriverError, match="the archive does not match its digest"):
        await driver.create(Output())


async def test_an_unknown_image_is_a_driver_error(make_driver: MakeDriver) -> None:
    driver = make_driver(image="marid-test/nowhere:1")

    with pytest.raises(DriverError) as raised:
        await driver.create(Output())

    assert str(raised.value) == (
        "image marid-test/nowhere:1 not found: upload it with POST /images (driver docker)"
        " or load it on the runner (this runner pulls no images: docker.pull is never)"
    )


# --- cleanup ---------------------------------------------------------------------------------


async def _succeed(driver: DockerDriver, tmp_path: Path) -> None:
    await driver.create(Output())
    (tmp_path / "object").write_bytes(b"x")
    await driver.place_object(tmp_path / "object", "object")  # makes the helper container
    await run(driver, "true")


async def _fail(driver: DockerDriver, tmp_path: Path) -> None:
    await driver.create(Output())
    assert await driver.run("fails", "exit 1", {}, Output()) == Exit(1, "exit status 1")


async def _stop(driver: DockerDriver, tmp_path: Path) -> None:
    await driver.create(Output())
    out = Output()
    job = asyncio.create_task(driver.run("sleeps", "echo started; sleep 60", {}, out))
    await out.wait_for("started")
    await driver.stop()
    await job


async def _fail_to_create(driver: DockerDriver, tmp_path: Path) -> None:
    with pytest.raises(DriverError):
        await driver.create(Output())


@pytest.mark.parametrize("scenario", [_succeed, _fail, _stop, _fail_to_create])
async def test_destroy_leaves_nothing_labelled_for_the_build(
    make_driver: MakeDriver,
    docker_engine: docker.DockerClient,
    tmp_path: Path,
    scenario: Callable[[DockerDriver, Path], Awaitable[None]],
) -> None:
    image = "marid-test/nowhere:1" if scenario is _fail_to_create else BUSYBOX
    driver = make_driver(image=image)
    await scenario(driver, tmp_path)

    await driver.destroy()
    await driver.destroy()  # idempotent

    assert labelled(docker_engine, driver.build_id) == []


async def test_remove_leftovers_removes_what_a_build_left(
    make_driver: MakeDriver, docker_engine: docker.DockerClient
) -> None:
    driver = make_driver()
    await driver.create(Output())
    await run(driver, "true")
    assert len(labelled(docker_engine, driver.build_id)) == 2  # the job container and volume

    await remove_leftovers(docker_engine, driver.build_id)

    assert labelled(docker_engine, driver.build_id) == []


async def test_remove_leftovers_spares_other_installations(
    docker_engine: docker.DockerClient,
) -> None:
    """Two installations sharing an engine both have a build with this id: cleaning up after
    one must not touch the other's containers."""
    build_id = next(_build_ids)
    ours, theirs = (
        DockerDriver(
            docker_engine,
            build_id,
            1,
            BUSYBOX,
            WORKSPACE,
            LIMITS,
            "none",
            "never",
            nothing_uploaded,
            instance=name,
        )
        for name in ("ours", "theirs")
    )
    try:
        for driver in (ours, theirs):
            await driver.create(Output())
        await remove_leftovers(docker_engine, build_id, instance="ours")
        assert [
            v.name
            for v in docker_engine.volumes.list(filters={"label": f"{LABEL_BUILD}={build_id}"})
        ] == [theirs.volume]
    finally:
        await ours.destroy()
        await theirs.destroy()
    assert labelled(docker_engine, build_id) == []
