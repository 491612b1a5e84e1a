"""Runners on other machines (issue 15, Acceptance 1 and 3): `marid serve` and two
`marid runner --server URL --token-file F` processes that cannot reach PostgreSQL at all.

Each runner runs in a network namespace of its own with only a loopback device
(`unshare --net`): there, 127.0.0.1:<API port> is a forwarder (tests/faults/forward.py) to a
Unix socket, and a second forwarder outside carries that to the API. PostgreSQL's port does not
exist in the runners' namespace, so a connection to it is refused, and neither their
configuration nor their environment names a database or a crypto key. They run the three-stage
build of the builds tests in Docker (masked variable masked, artifact byte-identical), a kill
reaches them, and when one is killed with SIGKILL mid-build the other recovers the build after
its lease, as in-process runners do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from marid import remote
from tests.faults.conftest import MARID, Installation, attach, until


def _can_isolate() -> bool:
    """Whether this host lets us start a process in a network namespace of its own (root, or
    unprivileged user namespaces, and util-linux's unshare and nsenter, iproute2's ip)."""
    try:
        done = subprocess.run(
            ["unshare", "--net", "ip", "link", "set", "lo", "up"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


pytestmark = [
    pytest.mark.docker,
    # Under CI (MARID_REQUIRE_DOCKER=1, .ci/run) it never skips: a host that cannot isolate
    # the runners fails these tests rather than hiding them.
    pytest.mark.skipif(
        not _can_isolate() and os.environ.get("MARID_REQUIRE_DOCKER") != "1",
        reason="needs `unshare --net` (root) to keep the runners away from PostgreSQL",
    ),
]

FORWARD = str(Path(__file__).with_name("forward.py"))
RUNNERS = ("remote-1", "remote-2")
LEASE = 4  # seconds: the runners' leases, so that a dead one's build is recovered quickly
THREE_STAGES = """\
driver: {type: docker, image: 'marid-test/busybox:latest', workspace: /w}
env:
- PLAIN=visible
objects:
- data.txt => conf/data.txt
stages: [lint, test, package]
allow_failures: [lint]
jobs:
- stage: lint
  commands: [echo linting, exit 1]
- stage: test
  name: Unit Tests
  commands: ['echo "secret is $SECRET"', cat conf/data.txt]
- stage: package
  commands:
  - head -c 300000 /dev/urandom > app.bin
  - sha256sum app.bin
  artifacts:
  - app.bin => dist/app.bin
"""
SLEEPER = """\
driver: {type: docker, image: 'marid-test/busybox:latest', workspace: /w}
stages: [s]
jobs:
- stage: s
  commands: [set +x, echo ready, sleep 600]
"""
SHORT = """\
driver: {type: docker, image: 'marid-test/busybox:latest', workspace: /w}
stages: [s]
jobs:
- stage: s
  commands: [set +x, echo ready, sleep 6, echo done]
"""


class RemoteInstallation(Installation):
    """serve and the scheduler as the harness starts them; two runners on the API alone."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.socket = self.directory / "api.sock"
        self.enrolment = self.directory / "enrolment-token"
        self.forwarder: subprocess.Popen[bytes] | None = None
        self.runner_config = self.directory / "runner.yml"
        # A build host's configuration: no server, database or crypto sections at all.
        self.runner_config.write_text(
            yaml.safe_dump(
                {
                    "drivers": ["docker"],
                    "docker": {"pull": "never", "network": "none"},
                    "runner": {"lease": f"{LEASE}s", "parallelism": 2},
                    "logging": {"level": "info"},
                    "reaper": {"interval": "5s", "grace": "1s"},
                }
            )
        )

    async def start_all(self) -> None:
        for name in ("serve", "scheduler"):
            self.start(name)
        await self.serving()
        self.token = await self.make_token()
        conn = await asyncpg.connect(self.dsn)
        try:
            _, value = await remote.create_enrolment(conn, "faults", None, None)
        finally:
            await conn.close()
        self.enrolment.write_text(value + "\n")
        self.forwarder = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, FORWARD, "unix-to-tcp", str(self.socket), str(self.port)],
            start_new_session=True,
        )
        for name in RUNNERS:
            self.start(name)

    def start(self, name: str) -> None:
        if name not in RUNNERS:
            super().start(name)
            return
        assert self.processes.get(name) is None or self.processes[name].poll() is not None
        # Only what a build host's shell would have: no DSN, no MARID_CONFIG, no crypto key.
        env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
        env["TMPDIR"] = str(self.temp)
        command = (
            f"ip link set lo up && {sys.executable} {FORWARD} tcp-to-unix {self.port}"
            f" {self.socket} & exec {MARID} --config {self.runner_config} runner"
            f" --server {self.url} --token-file {self.enrolment}"
        )
        with self.log(name).open("ab") as log:
            log.write(f"--- marid runner --server ({name}) started at {time.time():.3f}\n".encode())
            log.flush()
            self.processes[name] = subprocess.Popen(
                ["unshare", "--net", "sh", "-c", command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its forwarder goes with its process group
            )

    async def close(self) -> None:
        await super().close()
        for process in [*self.processes.values(), self.forwarder]:
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        if self.forwarder is not None:
            self.forwarder.wait(timeout=10)

    async def remote_runners(self) -> dict[str, str]:
        """The alive registered runners' names, by the process that runs each."""
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                "SELECT name, hostname FROM runners r"
                " WHERE token_digest IS NOT NULL AND runner_alive(r)"
            )
        finally:
            await conn.close()
        found = {}
        for row in rows:
            for name in RUNNERS:
                if row["name"].endswith(f"-{self.processes[name].pid}"):
                    found[name] = row["name"]
        return found

    async def runner_of(self, build: dict[str, Any]) -> str:
        conn = await asyncpg.connect(self.dsn)
        try:
            claimed = await conn.fetchval("SELECT runner FROM builds WHERE id = $1", build["id"])
        finally:
            await conn.close()
        for name, registered in (await self.remote_runners()).items():
            if registered == claimed:
                return name
        raise AssertionError(f"build {build['number']} is run by {claimed!r}, no runner of ours")


@pytest.fixture
async def marid(
    request: pytest.FixtureRequest, shared_dsn: str, tmp_path: Path, docker_engine: Any
) -> Any:
    installation = RemoteInstallation(tmp_path / "marid", shared_dsn, {}, docker_engine)
    attach(request.node, installation)
    try:
        await installation.start_all()
        await until("both remote runners to register", _both(installation))
        yield installation
    finally:
        await installation.close()


def _both(installation: RemoteInstallation) -> Any:
    async def registered() -> bool:
        installation.assert_running()
        return len(await installation.remote_runners()) == 2

    return registered


async def test_remote_runners_have_no_database_and_run_builds(marid: RemoteInstallation):
    # Their configuration and their environment name no database and no crypto key ...
    settings = yaml.safe_load(marid.runner_config.read_text())
    assert not {"database", "crypto", "server"} & set(settings)
    for name in RUNNERS:
        environ = Path(f"/proc/{marid.processes[name].pid}/environ").read_bytes()
        assert b"postgres" not in environ and b"MARID_CONFIG" not in environ
    # ... and PostgreSQL refuses a connection from where they are.
    port = int(marid.dsn.rsplit(":", 1)[1].split("/")[0])
    probe = await asyncio.to_thread(
        subprocess.run,
        [
            "nsenter",
            f"--net=/proc/{marid.processes[RUNNERS[0]].pid}/ns/net",
            sys.executable,
            "-c",
            f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode != 0 and "ConnectionRefusedError" in probe.stderr, probe.stderr

    status, _ = await marid.request(
        "POST", "/variables", json={"key": "SECRET", "value": "hunter2-secret", "mask": True}
    )
    assert status == 201
    status, _ = await marid.request("POST", "/objects?name=data.txt", data=b"object content\n")
    assert status == 201
    build = await marid.finished(await marid.submit(THREE_STAGES))
    assert build["status"] == "passed_with_failures", build["output"]
    assert "secret is xxxxxx" in build["output"] and "hunter2" not in build["output"]
    assert "object content" in build["output"]
    status, artifacts = await marid.request("GET", f"/b/alice/{build['number']}/artifacts")
    assert [(a["name"], a["size"]) for a in artifacts] == [("dist/app.bin", 300000)]
    async with marid.http.get(
        f"{marid.url}/b/alice/{build['number']}/artifacts/dist/app.bin",
        headers={**marid.headers, "Accept": "application/octet-stream"},
    ) as raw:
        content = await raw.read()
    digest = hashlib.sha256(content).hexdigest()
    assert f"{digest}  app.bin" in build["output"]  # what sha256sum printed in the container
    assert digest == artifacts[0]["sha256"]

    sleeper = await marid.submit(SLEEPER)
    await marid.until_output(sleeper, "s.1", "ready\n")
    status, _ = await marid.request("DELETE", f"/b/alice/{sleeper['number']}")
    assert status == 204
    killed = await marid.finished(sleeper, bound=60)
    assert killed["status"] == "killed"


async def test_a_remote_runner_killed_mid_build_is_recovered_by_the_other(
    marid: RemoteInstallation,
):
    build = await marid.submit(SHORT)
    await marid.until_output(build, "s.1", "ready\n")
    first = await marid.runner_of(build)
    marid.kill(first)  # kill -9: it neither hands the build back nor withdraws
    done = await marid.finished(build)
    assert done["status"] == "passed", done["output"]
    assert "orphaned" in done["tags"]
    output = await marid.job_output(build, "s.1")
    assert output.endswith("ready\ndone\n") and "attempt 2" in done["output"]
    other = await marid.runner_of(done)
    assert other != first


async def test_serve_stops_at_once_while_remote_runners_wait_for_work(
    marid: RemoteInstallation,
):
    """Their long polls are answered when serve stops, not held to their end (30 s)."""
    await asyncio.sleep(1)  # both runners' claims are parked at the API
    started = time.monotonic()
    await asyncio.to_thread(marid.terminate, "serve", 25)
    assert marid.exits["serve"] == [0]
    assert time.monotonic() - started < 15
    marid.assert_running(*RUNNERS)  # they wait for the API to come back
