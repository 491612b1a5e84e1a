"""The qemu driver (issue 12 part 1): whole builds submitted over HTTP and run by a real runner
in VMs of scripts/qemu-test-image, booted by qemu-system-x86_64 (KVM where it is hardware KVM,
else TCG: see tests/runner/test_qemu_image.py), and what the driver refuses without booting."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid.api.app import create_app
from marid.blobs import open_store
from marid.config import Config, ConfigError, QemuDriverConfig
from marid.runner.drivers.qemu import accelerator
from marid.runner.worker import Worker
from tests.conftest import MakeToken, bearer
from tests.runner.conftest import background_remote_worker, background_worker, settings
from tests.runner.test_worker import finished, submit

SCOPE = "build:read,write,delete variable:write object:write image:write"
BASE = "https://ci.example.com"  # the test configuration's server.url
BOOT_WAIT = 400.0  # seconds a build that boots a VM may take here (TCG boots in about 20)


@pytest.fixture
def base_images(tmp_path: Path, qemu_image: Path) -> Path:
    """A qemu_driver.images directory holding the test image as `marid/test`."""
    directory = tmp_path / "base-images"
    (directory / "marid").mkdir(parents=True)
    (directory / "marid" / "test.qcow2").symlink_to(qemu_image)
    return directory


@pytest.fixture
def qemu_config(config: Config, tmp_path: Path, base_images: Path) -> Config:
    return dataclasses.replace(
        config,
        drivers=["qemu"],
        qemu_driver=QemuDriverConfig(images=str(base_images), work_dir=str(tmp_path / "qemu")),
        runner=dataclasses.replace(config.runner, lease=5.0),
    )


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], qemu_config: Config, pool: asyncpg.Pool
) -> TestClient:
    return await aiohttp_client(create_app(qemu_config, pool))


@pytest.fixture
async def worker(qemu_config: Config, pool: asyncpg.Pool) -> AsyncIterator[Worker]:
    async with background_worker(qemu_config, pool) as running:
        yield running


@pytest.fixture(params=["in-process", "remote"])
async def either_worker(
    request: pytest.FixtureRequest, qemu_config: Config, pool: asyncpg.Pool, client: TestClient
) -> AsyncIterator[Worker]:
    """A runner with a DSN, or one on another machine, which fetches uploaded images through
    the API (issue 15)."""
    if request.param == "in-process":
        async with background_worker(qemu_config, pool) as running:
            yield running
        return
    url = str(client.server.make_url("/api"))
    async with background_remote_worker(qemu_config, pool, url) as remote:
        yield remote


async def wait_until(
    client: TestClient, token: str, build: dict, done: Callable[[dict], bool]
) -> dict:
    path = build["url"].removeprefix(BASE)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOOT_WAIT
    while loop.time() < deadline:
        body = await (await client.get(path, headers=bearer(token))).json()
        if done(body):
            return dict(body)
        await asyncio.sleep(0.1)
    raise AssertionError(f"build {build['number']} never got there: {body}")


async def jobs_of(client: TestClient, token: str, build: dict) -> list[dict]:
    resp = await client.get(f"/api/b/alice/{build['number']}/jobs", headers=bearer(token))
    return list(await resp.json())


def vms(worker: Worker, build_id: int) -> list[str]:
    """qemu processes of the build's attempts still running on this machine."""
    done = subprocess.run(
        ["pgrep", "-f", "--", f"-name marid-{worker.instance}-{build_id}-"],
        capture_output=True,
        text=True,
    )
    return done.stdout.split()


def vm_directories(qemu_config: Config) -> list[Path]:
    vms_dir = Path(qemu_config.qemu_driver.work_dir) / "vms"
    return list(vms_dir.iterdir()) if vms_dir.is_dir() else []


async def upload_image(client: TestClient, token: str, name: str, path: Path) -> None:
    resp = await client.post(
        f"/api/images?name={name}",
        headers={**bearer(token), "Content-Type": "application/x-qemu-disk"},
        data=path.open("rb"),
    )
    assert resp.status == 201, await resp.text()


THREE_JOBS = """\
driver:
  type: qemu
  image: {image}
resources:
  memory: 768m
  cpus: "2"
env:
- PLAIN=visible
objects:
- data.txt => conf/data.txt
stages:
- lint
- test
- package
allow_failures:
- lint
jobs:
- stage: lint
  commands:
  - echo linting
  - exit 1
- stage: test
  commands:
  - echo "secret is $SECRET and $PLAIN"
  - cat conf/data.txt
  - whoami
  - pwd
  - nproc
  - awk '/MemTotal/ {{ print int($2 / 1024) }}' /proc/meminfo
- stage: package
  commands:
  - head -c 300000 /dev/urandom > app.bin
  artifacts:
  - app.bin => dist/app.bin
"""


async def test_a_three_job_build_runs_in_a_vm_of_an_uploaded_image(
    client: TestClient,
    token: MakeToken,
    either_worker: Worker,
    qemu_config: Config,
    qemu_image: Path,
) -> None:
    worker = either_worker
    before = qemu_image.stat()
    value = await token(SCOPE)
    await upload_image(client, value, "bookworm", qemu_image)
    await client.post(
        "/api/variables",
        headers=bearer(value),
        json={"key": "SECRET", "value": "hunter2-qemu", "mask": True},
    )
    await client.post("/api/objects?name=data.txt", headers=bearer(value), data=b"object content\n")
    build = await submit(client, value, THREE_JOBS.format(image="bookworm"))
    build = await wait_until(client, value, build, finished)
    assert build["status"] == "passed_with_failures", build["output"]
    jobs = await jobs_of(client, value, build)
    assert [(j["name"], j["status"]) for j in jobs] == [
        ("create-driver", "passed"),
        ("lint.1", "passed_with_failures"),
        ("test.1", "passed"),
        ("package.1", "passed"),
    ]
    create = jobs[0]["output"]
    assert "Using uploaded image bookworm\n" in create
    assert f"({accelerator('auto')}, 768 MiB memory, 2 CPUs)\n" in create
    assert "The VM answered SSH in " in create
    assert jobs[1]["output"].endswith("+ exit 1\nexit status 1\n")
    lines = [line for line in jobs[2]["output"].splitlines() if not line.startswith("+ ")]
    assert lines[:5] == ["secret is xxxxxx and visible", "object content", "root", "/root", "2"]
    assert 600 < int(lines[5]) <= 768  # MiB the guest's kernel sees of the 768 it was given
    assert "hunter2" not in build["output"]
    base = f"/api/b/alice/{build['number']}"
    artifacts = await (await client.get(base + "/artifacts", headers=bearer(value))).json()
    raw = await client.get(
        base + "/artifacts/dist/app.bin",
        headers={**bearer(value), "Accept": "application/octet-stream"},
    )
    content = await raw.read()
    assert len(content) == 300000 == artifacts[0]["size"]
    assert hashlib.sha256(content).hexdigest() == artifacts[0]["sha256"]
    # The VM is gone with its directory; the upload was fetched once into the cache, checked,
    # and neither it nor the image it came from was written.
    assert vms(worker, build["id"]) == [] and vm_directories(qemu_config) == []
    cached = list((Path(qemu_config.qemu_driver.work_dir) / "images").iterdir())
    assert [p.name for p in cached] == [
        f"{hashlib.sha256(qemu_image.read_bytes()).hexdigest()}.qcow2"
    ]
    assert cached[0].stat().st_mode & 0o777 == 0o444
    after = qemu_image.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


RESUMED = """\
driver: {type: qemu, image: marid/test}
stages: [one, two, three]
jobs:
- stage: one
  commands: [echo one >> log.txt]
- stage: two
  commands: [echo two >> log.txt]
- stage: three
  commands:
  - cat log.txt
  - test -e third-ran || { touch third-ran; exit 1; }
"""


async def test_a_failed_vm_build_keeps_its_disk_and_resumes_from_job_3_in_a_copy(
    client: TestClient, token: MakeToken, qemu_config: Config, pool: asyncpg.Pool
) -> None:
    """Issue 14 item 1 on the qemu driver: the failed build's disk overlay is kept (flushed
    first), and the resumed build boots a copy of it, where jobs 1 and 2's file is."""
    keeping = dataclasses.replace(
        qemu_config, builds=dataclasses.replace(qemu_config.builds, keep_workspace=3600.0)
    )
    value = await token(SCOPE)
    async with background_worker(keeping, pool):
        first = await wait_until(client, value, await submit(client, value, RESUMED), finished)
        assert first["status"] == "failed", first["output"]
        kept = list((Path(qemu_config.qemu_driver.work_dir) / "kept").iterdir())
        assert len(kept) == 1 and kept[0].suffix == ".qcow2"
        resp = await client.post(
            "/api/b/alice/1/restart", headers=bearer(value), json={"from": "three.1"}
        )
        assert resp.status == 201, await resp.text()
        again = await wait_until(client, value, await resp.json(), finished)
    assert again["status"] == "passed", again["output"]
    jobs = {j["name"]: j for j in await jobs_of(client, value, again)}
    assert jobs["one.1"]["reused_from"].endswith("/b/alice/1/jobs/one.1")
    assert "+ cat log.txt\none\ntwo\n+ test -e third-ran\n" in jobs["three.1"]["output"]
    assert kept[0].is_file()  # the original's, unchanged; the copy went with its VM


async def test_a_kill_during_a_job_powers_the_vm_off(
    client: TestClient, token: MakeToken, worker: Worker, qemu_config: Config
) -> None:
    value = await token(SCOPE)
    manifest = (
        "driver: {type: qemu, image: marid/test}\n"
        "stages: [test]\njobs:\n- stage: test\n  commands:\n  - echo started\n  - sleep 600\n"
    )
    build = await submit(client, value, manifest)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOOT_WAIT
    printed = ""
    while loop.time() < deadline and "+ sleep 600" not in printed:  # the job's sleep runs
        await asyncio.sleep(0.2)
        (job,) = [j for j in await jobs_of(client, value, build) if j["stage"] == "test"]
        resp = await client.get(f"{job['url'].removeprefix(BASE)}/output", headers=bearer(value))
        printed = await resp.text()
    assert job["status"] == "running" and "+ sleep 600" in printed, (job, printed)
    assert len(vms(worker, build["id"])) == 1
    resp = await client.delete(f"/api/b/alice/{build['number']}", headers=bearer(value))
    assert resp.status == 204
    killed = await wait_until(client, value, build, finished)
    assert killed["status"] == "killed"
    assert "Using base image marid/test\n" in killed["output"]
    assert killed["output"].endswith("killed on request\n"), killed["output"]
    assert vms(worker, build["id"]) == [] and vm_directories(qemu_config) == []


async def test_a_job_time_limit_ends_the_job_and_powers_the_vm_off(
    client: TestClient, token: MakeToken, worker: Worker, qemu_config: Config
) -> None:
    value = await token(SCOPE)
    manifest = (
        "driver: {type: qemu, image: marid/test}\nstages: [test, later]\njobs:\n"
        "- stage: test\n  timeout: 2s\n  commands:\n  - sleep 600\n"
        "- stage: later\n  commands:\n  - echo never\n"
    )
    build = await wait_until(client, value, await submit(client, value, manifest), finished)
    assert build["status"] == "timed_out"
    assert build["output"].endswith("time limit 2s reached\n"), build["output"]
    assert "never" not in build["output"]
    assert vms(worker, build["id"]) == [] and vm_directories(qemu_config) == []


async def test_a_vm_that_does_not_answer_ssh_in_time_fails_with_the_console(
    client: TestClient, token: MakeToken, qemu_config: Config, pool: asyncpg.Pool
) -> None:
    hasty = dataclasses.replace(
        qemu_config,
        qemu_driver=dataclasses.replace(qemu_config.qemu_driver, boot_timeout=2.0),
    )
    async with background_worker(hasty, pool) as runner:
        value = await token(SCOPE)
        build = await submit(client, value, "driver: {type: qemu, image: marid/test}\n")
        build = await wait_until(client, value, build, finished)
    assert build["status"] == "failed"
    assert "error: the VM did not answer SSH within 2s" in build["output"], build["output"]
    assert vms(runner, build["id"]) == [] and vm_directories(hasty) == []


@pytest.mark.parametrize("image", ["nope", "../marid/test", "marid/../marid/test", "/etc/passwd"])
async def test_an_image_that_is_neither_uploaded_nor_a_base_image_is_a_clear_error(
    client: TestClient, token: MakeToken, worker: Worker, image: str
) -> None:
    value = await token(SCOPE)
    build = await submit(client, value, f"driver: {{type: qemu, image: '{image}'}}\n")
    build = await wait_until(client, value, build, finished)
    assert build["status"] == "failed"
    assert (
        f"error: image {image}: no uploaded qemu image of this name and no such base image\n"
        in build["output"]
    ), build["output"]


# Each names RUNNER_FILE, a file in the test's directory standing for one of the runner's (never
# a real one: `qemu-img create -o data_file=F` truncates F to the image's size).
@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["-b", "{runner_file}", "-F", "raw"], "names a backing file, which is refused"),
        (["-o", "data_file={runner_file}"], "names an external data file, which is refused"),
    ],
)
async def test_an_upload_naming_a_file_of_the_runner_is_refused_without_booting(
    client: TestClient,
    token: MakeToken,
    worker: Worker,
    qemu_config: Config,
    tmp_path: Path,
    options: list[str],
    reason: str,
) -> None:
    evil, runner_file = tmp_path / "evil.qcow2", tmp_path / "runner-secret"
    runner_file.write_text("root:secret\n")
    options = [option.format(runner_file=runner_file) for option in options]
    await asyncio.to_thread(
        subprocess.run,
        ["qemu-img", "create", "-q", "-f", "qcow2", *options, str(evil), "1M"],
        check=True,
    )
    runner_file.write_text("root:secret\n")  # what the guest would read (or write) if booted
    value = await token(SCOPE)
    await upload_image(client, value, "evil", evil)
    build = await submit(client, value, "driver: {type: qemu, image: evil}\n")
    build = await wait_until(client, value, build, finished)
    assert build["status"] == "failed"
    assert f"error: image evil: {reason}\n" in build["output"], build["output"]
    assert not list((Path(qemu_config.qemu_driver.work_dir) / "images").iterdir())
    assert vms(worker, build["id"]) == []
    assert runner_file.read_text() == "root:secret\n"


# A runner killed by SIGKILL takes its VMs with it; a retried attempt clears the directory.
ORPHAN = """\
import asyncio, sys
from pathlib import Path
from marid.config import QemuDriverConfig
from marid.runner.drivers.base import Limits
from marid.runner.drivers.qemu import QemuDriver

async def main() -> None:
    config = QemuDriverConfig(images=sys.argv[1], work_dir=sys.argv[2])
    driver = QemuDriver(config, "marid/test", Limits(512 * 1024**2, 1, 64), None, sys.argv[3])
    driver._prepare(driver._base_image())
    driver._keys()
    await driver._boot("tcg", 256, 1)
    print(driver.process.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_a_runner_killed_takes_its_vm_with_it_and_a_retry_clears_its_directory(
    qemu_config: Config, base_images: Path
) -> None:
    from marid.runner.drivers.base import Limits
    from marid.runner.drivers.qemu import QemuDriver

    settings = qemu_config.qemu_driver
    name = "marid-test-77-1"
    runner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ORPHAN, str(base_images), settings.work_dir, name,
        stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert runner.stdout is not None
    qemu_pid = int(await asyncio.wait_for(runner.stdout.readline(), 60))
    assert Path(f"/proc/{qemu_pid}").exists()
    os.kill(runner.pid, signal.SIGKILL)
    await runner.wait()
    for _ in range(200):  # the kernel delivers the parent-death signal at once; reaping follows
        if not Path(f"/proc/{qemu_pid}").exists() or _zombie(qemu_pid):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("qemu outlived its runner")
    leftover = Path(settings.work_dir) / "vms" / name
    assert leftover.is_dir()
    retry = QemuDriver(
        settings, "marid/test", Limits(512 * 1024**2, 1, 64), None, "marid-test-77-2"
    )  # type: ignore[arg-type]
    await retry.clear_previous()
    assert not leftover.exists()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def test_a_runner_offers_qemu_only_where_qemu_is_installed(
    qemu_config: Config, pool: asyncpg.Pool
) -> None:
    blobs = open_store(qemu_config.storage)
    assert "qemu" in Worker(qemu_config, pool, blobs).drivers
    missing = dataclasses.replace(
        qemu_config, qemu_driver=QemuDriverConfig(binary="qemu-system-nonexistent")
    )
    assert "qemu" not in Worker(missing, pool, blobs).drivers


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"accel": "hvf"}, "qemu_driver.accel: must be one of auto, kvm, tcg"),
        ({"network": "bridge"}, "qemu_driver.network: must be one of none, user"),
        ({"boot_timeout": "0s"}, "qemu_driver.boot_timeout: must be longer than 0s"),
        ({"images": ""}, "qemu_driver.images: must not be empty"),
    ],
)
def test_qemu_driver_settings_are_checked(section: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_module.from_dict(settings(drivers=["qemu"], qemu_driver=section))
    assert str(caught.value) == f"config: {message}"


def test_qemu_driver_settings_have_defaults() -> None:
    section = {"images": "/srv/images", "boot_timeout": "3m"}
    qemu = config_module.from_dict(settings(qemu_driver=section)).qemu_driver
    assert qemu == QemuDriverConfig(images="/srv/images", boot_timeout=180.0)
    assert (qemu.accel, qemu.network, qemu.binary) == ("auto", "none", "qemu-system-x86_64")
