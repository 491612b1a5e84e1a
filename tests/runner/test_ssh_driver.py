"""The ssh driver against a real OpenSSH server on loopback (tests/fixtures/sshd.py): the
driver protocol (docs/manifest.md §9.4), then whole builds through a runner (issue 12)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid.api.app import create_app
from marid.blobs import open_store
from marid.config import Config, ConfigError, SshDriverConfig
from marid.runner.drivers.base import DriverError, Exit, SshKey
from marid.runner.drivers.ssh import SshDriver, Target, load_key, parse_address
from marid.runner.worker import Worker
from tests.conftest import MakeToken, bearer
from tests.fixtures.sshd import Sshd, keygen, running_sshd
from tests.runner.conftest import background_remote_worker, settings
from tests.runner.test_worker import finished, submit, wait_for

MakeDriver = Callable[..., SshDriver]


class Output:
    """An output sink keeping every chunk."""

    def __init__(self) -> None:
        self.data = b""
        self._changed = asyncio.Event()

    async def __call__(self, chunk: bytes) -> None:
        self.data += chunk
        self._changed.set()

    @property
    def text(self) -> str:
        return self.data.decode()

    async def wait_for(self, text: str) -> None:
        async with asyncio.timeout(10):
            while text not in self.text:
                self._changed.clear()
                await self._changed.wait()


def target(sshd: Sshd, known_hosts: Path | None = None, port: int | None = None) -> Target:
    return Target(
        address=f"127.0.0.1:{port or sshd.port}",
        user="root",
        key=load_key(str(sshd.key)),
        known_hosts=str(known_hosts or sshd.known_hosts),
        connect_timeout=10.0,
    )


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
async def make_driver(sshd: Sshd) -> AsyncIterator[MakeDriver]:
    made: list[SshDriver] = []

    def make(**kwargs: object) -> SshDriver:
        name = f"marid-test-{secrets.token_hex(4)}-1-1"
        driver = SshDriver(target(sshd, **kwargs), name)  # type: ignore[arg-type]
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await driver.destroy()


@pytest.fixture
async def driver(make_driver: MakeDriver) -> SshDriver:
    made = make_driver()
    await made.create(Output())
    return made


def sh(script: str) -> str:
    return f"#!/bin/sh\nexec 2>&1\nset -e\n{script}\n"


def remote(pattern: str) -> list[str]:
    """Processes of this machine (the sshd's host) whose command line matches `pattern`."""
    done = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return done.stdout.split()


async def test_create_connects_and_makes_a_workspace(make_driver: MakeDriver) -> None:
    driver = make_driver()
    out = Output()
    await driver.create(out)
    assert out.text.startswith(f"Connecting to root@{driver.target.address}\n")
    assert f"workspace {driver.workspace}\n" in out.text
    assert Path(driver.workspace).is_dir()


async def test_jobs_run_in_the_workspace_as_root_with_the_variables(driver: SshDriver) -> None:
    out = Output()
    env = {"PLAIN": "a b $HOME 'quoted'", "OTHER": "x=y"}
    script = 'pwd; id -u; echo "$PLAIN|$OTHER|$HOME"; echo oops >&2'
    ending = await driver.run("job", sh(script), env, out)
    assert ending == Exit(0, "")
    assert out.text == f"{driver.workspace}\n0\na b $HOME 'quoted'|x=y|/root\noops\n"


async def test_output_is_streamed_while_the_job_runs(driver: SshDriver, tmp_path: Path) -> None:
    out = Output()
    gate = tmp_path / "gate"
    job = asyncio.create_task(
        driver.run("job", sh(f"printf first; while [ ! -e {gate} ]; do sleep 0.05; done"), {}, out)
    )
    await out.wait_for("first")  # before the job ends
    gate.touch()
    assert await job == Exit(0, "")


async def test_run_returns_the_exit_status_and_the_reason(driver: SshDriver) -> None:
    assert await driver.run("job", sh("exit 3"), {}, Output()) == Exit(3, "exit status 3")
    killed = await driver.run("job", sh("kill -9 $$"), {}, Output())
    assert killed == Exit(137, "killed by signal 9 (SIGKILL)")


async def test_files_persist_between_jobs(driver: SshDriver) -> None:
    await driver.run("one", sh("echo kept > file"), {}, Output())
    out = Output()
    await driver.run("two", sh("cat file"), {}, out)
    assert out.text == "kept\n"


async def test_a_background_process_does_not_hold_the_job(driver: SshDriver) -> None:
    marker = f"marid-bg-{secrets.token_hex(4)}"
    ending = await driver.run(
        "job", sh(f"sh -c 'sleep 300; : {marker}' &\necho started"), {}, Output()
    )
    assert ending == Exit(0, "")
    assert remote(marker) == []


async def test_stop_ends_the_job_and_its_processes(driver: SshDriver) -> None:
    marker = f"marid-stop-{secrets.token_hex(4)}"
    out = Output()
    job = asyncio.create_task(
        driver.run("job", sh(f"echo running; sh -c 'sleep 300; : {marker}'"), {}, out)
    )
    await out.wait_for("running")
    assert remote(marker)
    await driver.stop()  # returns once the job's channel closed
    assert await job == Exit(143, "terminated by signal 15 (SIGTERM)")
    assert remote(marker) == []
    # later jobs don't start
    assert (await driver.run("after", sh("echo no"), {}, Output())).status == 137


async def test_objects_are_placed_relative_or_absolute(driver: SshDriver, tmp_path: Path) -> None:
    content = tmp_path / "content"
    content.write_bytes(b"object\n")
    placed = await driver.place_object(content, "conf/data.txt")
    assert placed == f"{driver.workspace}/conf/data.txt"
    absolute = f"/tmp/marid-test-object-{secrets.token_hex(4)}/data.txt"
    assert await driver.place_object(content, absolute) == absolute
    out = Output()
    await driver.run("job", sh(f"cat conf/data.txt {absolute}; stat -c %a conf/data.txt"), {}, out)
    assert out.text == "object\nobject\n644\n"
    await driver.destroy()
    assert not Path(absolute).exists() and not Path(absolute).parent.exists()


async def test_keys_go_to_root_ssh_and_are_undone_by_destroy(driver: SshDriver) -> None:
    ssh = Path("/root/.ssh")
    before = {p.name: p.read_bytes() for p in ssh.iterdir()} if ssh.exists() else None
    name = f"marid-test-{secrets.token_hex(4)}"
    keys = [SshKey(name, "PRIVATE\n", f"Host example\n  IdentityFile /root/.ssh/{name}")]
    assert await driver.write_keys(keys) == {name: f"/root/.ssh/{name}"}
    assert (ssh / name).read_text() == "PRIVATE\n"
    assert oct((ssh / name).stat().st_mode & 0o777) == "0o600"
    config = (ssh / "config").read_text()
    assert config.startswith("\nStrictHostKeyChecking no\nUserKnownHostsFile /dev/null\n\n")
    assert config.endswith(f"IdentityFile /root/.ssh/{name}\n")
    await driver.destroy()
    after = {p.name: p.read_bytes() for p in ssh.iterdir()} if ssh.exists() else None
    assert after == before


async def test_artifacts_are_collected(driver: SshDriver, tmp_path: Path) -> None:
    await driver.run("job", sh("head -c 5000 /dev/urandom > a.bin; ln -s a.bin link"), {}, Output())
    await driver.collect("a.bin", tmp_path / "a", 0)
    await driver.collect("link", tmp_path / "b", 5000)
    assert (tmp_path / "a").read_bytes() == Path(driver.workspace, "a.bin").read_bytes()
    assert (tmp_path / "b").read_bytes() == (tmp_path / "a").read_bytes()
    for source, size, reason in [
        ("missing", 0, "missing: no such file"),
        (".", 0, ".: is a directory"),
        ("a.bin", 4999, "a.bin exceeds the maximum artifact size of 4999 bytes"),
    ]:
        with pytest.raises(DriverError) as caught:
            await driver.collect(source, tmp_path / "c", size)
        assert str(caught.value) == reason


async def test_destroy_removes_the_workspace(driver: SshDriver) -> None:
    await driver.run("job", sh("echo x > file"), {}, Output())
    root = driver.root
    assert Path(root).is_dir()
    await driver.destroy()
    await driver.destroy()  # idempotent
    assert not Path(root).exists()


async def test_a_retried_attempt_clears_what_an_earlier_attempt_left(sshd: Sshd) -> None:
    build = f"marid-test-{secrets.token_hex(4)}-7"
    marker = f"marid-orphan-{secrets.token_hex(4)}"
    first, out = SshDriver(target(sshd), f"{build}-1"), Output()
    await first.create(out)
    job = asyncio.create_task(
        first.run("job", sh(f"echo go; sh -c 'sleep 300; : {marker}'"), {}, out)
    )
    await out.wait_for("go")
    assert first.conn is not None
    first.conn.close()  # its runner died: the connection is gone, the job runs on
    assert (await job).status is None
    assert remote(marker) and Path(first.root).is_dir()
    second = SshDriver(target(sshd), f"{build}-2")
    await second.clear_previous()
    try:
        await second.create(Output())
        assert remote(marker) == []
        assert not Path(first.root).exists() and Path(second.root).is_dir()
    finally:
        await second.destroy()


async def test_an_unknown_host_key_is_refused(make_driver: MakeDriver, sshd: Sshd) -> None:
    driver = make_driver(known_hosts=sshd.other_known_hosts)
    with pytest.raises(DriverError) as caught:
        await driver.create(Output())
    assert str(caught.value).startswith(
        f"cannot connect to root@{sshd.address}: the host key is not in ssh_driver.known_hosts"
    )


async def test_a_key_the_host_refuses_is_a_clear_error(sshd: Sshd, tmp_path: Path) -> None:
    keygen(tmp_path / "k")
    driver = SshDriver(
        Target(sshd.address, "root", load_key(str(tmp_path / "k")), str(sshd.known_hosts), 10.0),
        "marid-test-refused-1-1",
    )
    with pytest.raises(DriverError) as caught:
        await driver.create(Output())
    assert str(caught.value) == (
        f"cannot connect to root@{sshd.address}: the host refused the runner's key (ssh_driver.key)"
    )
    await driver.destroy()


async def test_a_closed_port_is_a_clear_error(make_driver: MakeDriver) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        driver = make_driver(port=port)
        with pytest.raises(DriverError) as caught:
            await driver.create(Output())
    assert str(caught.value) == f"cannot connect to root@127.0.0.1:{port}: Connection refused"


async def test_a_host_that_never_answers_is_a_clear_error(sshd: Sshd) -> None:
    with socket.socket() as silent:  # accepts connections (backlog) and never speaks SSH
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        driver = SshDriver(
            Target(address, "root", load_key(str(sshd.key)), str(sshd.known_hosts), 0.5),
            "marid-test-silent-1-1",
        )
        with pytest.raises(DriverError) as caught:
            await driver.create(Output())
    assert str(caught.value) == f"cannot connect to root@{address}: no answer within 0.5s"
    await driver.destroy()


def test_addresses_are_parsed() -> None:
    assert parse_address("example.com:2222") == ("example.com", 2222)
    assert parse_address("example.com") == ("example.com", 22)
    assert parse_address("[::1]:2200") == ("::1", 2200)
    for bad in ("host:port", ":22", "host:70000"):
        with pytest.raises(DriverError):
            parse_address(bad)


# Whole builds: submitted over HTTP, run by a real runner on the loopback sshd (issue 12).

SCOPE = "build:read,write,delete variable:write object:write"


@pytest.fixture
def ssh_config(config: Config, sshd: Sshd) -> Config:
    return dataclasses.replace(
        config,
        drivers=["ssh"],
        ssh_driver=SshDriverConfig(key=str(sshd.key), known_hosts=str(sshd.known_hosts)),
        runner=dataclasses.replace(config.runner, lease=5.0),
    )


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], ssh_config: Config, pool: asyncpg.Pool
) -> TestClient:
    return await aiohttp_client(create_app(ssh_config, pool))


@pytest.fixture(params=["in-process", "remote"])
async def worker(
    request: pytest.FixtureRequest, ssh_config: Config, pool: asyncpg.Pool, client: TestClient
) -> AsyncIterator[Worker]:
    """A runner with a DSN, or one on another machine that reaches the API alone (issue 15:
    the same drivers work in both modes)."""
    if request.param == "remote":
        url = str(client.server.make_url("/api"))
        async with background_remote_worker(ssh_config, pool, url) as remote:
            yield remote
        return
    blobs = open_store(ssh_config.storage)
    running = Worker(ssh_config, pool, blobs)
    stop = asyncio.Event()
    task = asyncio.create_task(running.run(stop))
    yield running
    stop.set()
    await asyncio.wait_for(task, 60)
    await blobs.close()


def workspaces(worker: Worker, build_id: int) -> list[str]:
    """The directories a build's attempts made on the host (this machine)."""
    return [str(p) for p in Path("/tmp").glob(f"marid-{worker.instance}-{build_id}-*")]


def acceptance(address: str) -> str:
    return f"""\
driver:
  type: ssh
  address: {address}
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
- stage: package
  commands:
  - head -c 200000 /dev/urandom > app.bin
  artifacts:
  - app.bin => dist/app.bin
"""


async def test_a_three_stage_build_runs_over_ssh(
    client: TestClient, token: MakeToken, worker: Worker, sshd: Sshd
) -> None:
    value = await token(SCOPE)
    await client.post(
        "/api/variables",
        headers=bearer(value),
        json={"key": "SECRET", "value": "hunter2-secret", "mask": True},
    )
    await client.post("/api/objects?name=data.txt", headers=bearer(value), data=b"object content\n")
    build = await submit(client, value, acceptance(sshd.address))
    build = await wait_for(client, value, build["url"], finished)
    assert build["status"] == "passed_with_failures", build["output"]
    base = f"/api/b/alice/{build['number']}"
    jobs = await (await client.get(base + "/jobs", headers=bearer(value))).json()
    assert [(j["name"], j["status"]) for j in jobs] == [
        ("create-driver", "passed"),
        ("lint.1", "passed_with_failures"),
        ("test.1", "passed"),
        ("package.1", "passed"),
    ]
    assert f"Connecting to root@{sshd.address}\n" in jobs[0]["output"]
    assert jobs[1]["output"].endswith("+ exit 1\nexit status 1\n")
    test_output = jobs[2]["output"]
    assert "secret is xxxxxx and visible\n" in test_output and "hunter2" not in build["output"]
    assert "object content\nroot\n" in test_output.replace("+ whoami\n", "")
    artifacts = await (await client.get(base + "/artifacts", headers=bearer(value))).json()
    raw = await client.get(
        base + "/artifacts/dist/app.bin",
        headers={**bearer(value), "Accept": "application/octet-stream"},
    )
    content = await raw.read()
    assert len(content) == 200000 == artifacts[0]["size"]
    assert hashlib.sha256(content).hexdigest() == artifacts[0]["sha256"]
    assert workspaces(worker, build["id"]) == []


async def test_a_kill_during_a_job_ends_it_and_its_remote_processes(
    client: TestClient, token: MakeToken, worker: Worker, sshd: Sshd
) -> None:
    value = await token(SCOPE)
    marker = f"marid-kill-{secrets.token_hex(4)}"
    manifest = (
        f"driver: {{type: ssh, address: '{sshd.address}'}}\n"
        f"stages: [test]\njobs:\n- stage: test\n  commands:\n"
        f"  - echo started\n  - \"sh -c 'sleep 300; : {marker}'\"\n"
    )
    build = await submit(client, value, manifest)
    for _ in range(400):  # until the job's command runs on the host
        if remote(marker):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the job's command never ran")
    resp = await client.delete(f"/api/b/alice/{build['number']}", headers=bearer(value))
    assert resp.status == 204
    killed = await wait_for(client, value, build["url"], finished)
    assert killed["status"] == "killed"
    assert killed["output"].endswith("killed on request\n"), killed["output"]
    assert remote(marker) == []
    assert workspaces(worker, build["id"]) == []


async def test_a_host_with_another_key_is_refused_with_the_reason(
    client: TestClient, token: MakeToken, ssh_config: Config, pool: asyncpg.Pool, sshd: Sshd
) -> None:
    value = await token(SCOPE)
    settings = dataclasses.replace(ssh_config.ssh_driver, known_hosts=str(sshd.other_known_hosts))
    config = dataclasses.replace(ssh_config, ssh_driver=settings)
    blobs = open_store(config.storage)
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(config, pool, blobs).run(stop))
    try:
        manifest = f"driver: {{type: ssh, address: '{sshd.address}'}}\nstages: [a]\n"
        manifest += "jobs:\n- stage: a\n  commands: [echo never]\n"
        build = await wait_for(
            client, value, (await submit(client, value, manifest))["url"], finished
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await blobs.close()
    assert build["status"] == "failed"
    assert build["attempts"] == 1  # not retried: a new attempt would say the same
    assert (
        f"error: cannot connect to root@{sshd.address}: the host key is not in"
        " ssh_driver.known_hosts" in build["output"]
    )
    assert "never" not in build["output"].replace("echo never", "")


def test_a_runner_offers_ssh_only_when_the_driver_is_set_up(
    ssh_config: Config, sshd: Sshd, tmp_path: Path
) -> None:
    def offered(config: Config) -> list[str]:
        return Worker(config, None, None).drivers  # type: ignore[arg-type]

    assert offered(ssh_config) == ["ssh"]
    assert offered(dataclasses.replace(ssh_config, ssh_driver=SshDriverConfig())) == []
    missing = SshDriverConfig(key=str(tmp_path / "none"), known_hosts=str(sshd.known_hosts))
    assert offered(dataclasses.replace(ssh_config, ssh_driver=missing)) == []
    both = dataclasses.replace(ssh_config, drivers=["os", "ssh"])
    assert offered(both) == ["os", "ssh"]
    assert offered(dataclasses.replace(both, ssh_driver=SshDriverConfig())) == ["os"]


async def test_a_job_time_limit_ends_the_remote_job(
    client: TestClient, token: MakeToken, worker: Worker, sshd: Sshd
) -> None:
    value = await token(SCOPE)
    marker = f"marid-limit-{secrets.token_hex(4)}"
    manifest = (
        f"driver: {{type: ssh, address: '{sshd.address}'}}\n"
        f"stages: [test]\njobs:\n- stage: test\n  timeout: 1s\n  commands:\n"
        f"  - \"sh -c 'sleep 300; : {marker}'\"\n"
    )
    build = await wait_for(client, value, (await submit(client, value, manifest))["url"], finished)
    assert build["status"] == "timed_out"
    assert build["output"].endswith("time limit 1s reached\n"), build["output"]
    assert remote(marker) == []
    assert workspaces(worker, build["id"]) == []


BOTH = " (a runner logs in with the key and checks every host key against known_hosts)"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"key": "/k"}, "ssh_driver.known_hosts: required with ssh_driver.key" + BOTH),
        ({"known_hosts": "/h"}, "ssh_driver.key: required with ssh_driver.known_hosts" + BOTH),
        ({"key": "/k", "known_hosts": "/h", "user": ""}, "ssh_driver.user: must not be empty"),
        (
            {"key": "/k", "known_hosts": "/h", "connect_timeout": "0s"},
            "ssh_driver.connect_timeout: must be longer than 0s",
        ),
        ({"address": "x"}, "ssh_driver.address: unknown key"),
    ],
)
def test_ssh_driver_settings_are_checked(section: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_module.from_dict(settings(drivers=["ssh"], ssh_driver=section))
    assert str(caught.value) == f"config: {message}"


def test_ssh_driver_settings_have_defaults() -> None:
    section = {"key": "/etc/marid/id", "known_hosts": "/etc/marid/known_hosts"}
    ssh = config_module.from_dict(settings(ssh_driver=section)).ssh_driver
    assert ssh == SshDriverConfig("/etc/marid/id", "/etc/marid/known_hosts", "root", 30.0)
