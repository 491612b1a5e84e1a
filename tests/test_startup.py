"""`marid scheduler`, `marid runner` and `marid serve` started while PostgreSQL is down, as real
processes (issue 10 part 1, docs/configuration.md §2): they stay up, the scheduler and the
runner waiting for the database and serve answering 503; once it starts, each works without a
restart. SIGTERM while the database is still away ends each at once with status 0.

The tests stop the database, so they run on a cluster of their own (tests/fixtures/outage.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from marid import config as config_module
from marid import db
from marid.api.app import create_app
from marid.pgcluster import Cluster, free_port
from tests.fixtures.outage import start_database, stop_database
from tests.runner.conftest import docker_engine  # noqa: F401 - a fixture of the runner test
from tests.scheduler.test_outage import (
    Receiver,
    hook_and_cron,
    owner_token,
    queue_delivery,
    receiver,  # noqa: F401 - a fixture of the scheduler test
    runs_and_builds,
    settings,
)

Client = Callable[..., Awaitable[Any]]
WAIT, STEP = 120.0, 0.1  # seconds: a bound on every wait, and the polling step
STOPPED = 30.0  # seconds a process may take to exit after SIGTERM while it waits
BUSYBOX = "marid-test/busybox:latest"
MANIFEST = f"""\
driver: {{type: docker, image: '{BUSYBOX}', workspace: /w}}
stages: [s]
jobs:
- stage: s
  commands: [echo started after the outage]
"""


class Process:
    """A `marid` command run as a child process, its output (the log) in a file."""

    def __init__(self, command: list[str], config: Path, log: Path) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items() if k != "MARID_CONFIG"}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "marid", *command, "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    async def logged(self, text: str) -> None:
        """Wait until the log holds `text`; fail if the process ends first."""
        for _ in range(int(WAIT / STEP)):
            if text in self.text():
                return
            assert self.running(), f"exited with {self.proc.returncode}:\n{self.text()}"
            await asyncio.sleep(STEP)
        raise AssertionError(f"no {text!r} after {WAIT:g}s:\n{self.text()}")

    async def terminate(self) -> int:
        """SIGTERM, then its exit status (failing if it takes more than STOPPED seconds)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, STOPPED)
        except subprocess.TimeoutExpired:
            message = f"still running {STOPPED:g}s after SIGTERM:\n{self.text()}"
            raise AssertionError(message) from None


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[str, dict[str, Any]], Process]]:
    """`start(command, settings)`: the command running on a configuration file of those
    settings; killed at the end if a test left it running."""
    started: list[Process] = []

    def run(command: str, config: dict[str, Any]) -> Process:
        path = tmp_path / f"{command}-{len(started)}.yml"
        path.write_text(yaml.safe_dump(config))
        args = [command]
        if command == "up":  # its own data directory, a free port
            args += ["--data-dir", str(tmp_path / f"up-{len(started)}"), "--port", "0"]
        started.append(Process(args, path, tmp_path / f"{command}-{len(started)}.log"))
        return started[-1]

    yield run
    for process in started:
        if process.running():
            process.proc.kill()
            process.proc.wait()


async def until(what: str, check: Callable[[], Awaitable[object]]) -> None:
    """Poll the coroutine function `check` until it returns something true."""
    for _ in range(int(WAIT / STEP)):
        if await check():
            return
        await asyncio.sleep(STEP)
    raise AssertionError(f"still waiting after {WAIT:g}s for {what}")


def serving(dsn: str, tmp_path: Path) -> dict[str, Any]:
    """Settings for `marid serve` on a free loopback port."""
    port = free_port()
    url = {"url": f"http://127.0.0.1:{port}", "listen": f"127.0.0.1:{port}"}
    return {**settings(dsn, tmp_path), "server": url}


async def health(config: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """The status and body of GET /api/health, or None while nothing answers."""
    url = config["server"]["url"] + "/api/health"
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return resp.status, await resp.json()
    except aiohttp.ClientError:
        return None


async def waiting(process: Process, command: str, config: dict[str, Any]) -> None:
    """Until the process shows it is up while the database is away."""
    if command == "serve":
        await until("serve to answer", lambda: health(config))
    else:
        await process.logged(f"waiting for the database at {db.where(config['database']['dsn'])}")


@pytest.mark.parametrize("command", ["scheduler", "runner", "serve", "up"])
async def test_sigterm_while_the_database_is_away_ends_the_process_with_status_0(
    command: str,
    outage_cluster: Cluster,
    outage_dsn: str,
    tmp_path: Path,
    start: Callable[[str, dict[str, Any]], Process],
):
    await stop_database(outage_cluster)
    config = serving(outage_dsn, tmp_path)
    process = start(command, config)
    await waiting(process, command, config)
    assert await process.terminate() == 0, process.text()
    assert "Traceback" not in process.text()


async def test_a_scheduler_started_before_the_database_fires_and_delivers_once_it_is_up(
    aiohttp_client: Client,
    outage_cluster: Cluster,
    outage_dsn: str,
    receiver: Receiver,  # noqa: F811
    tmp_path: Path,
    start: Callable[[str, dict[str, Any]], Process],
):
    config = settings(outage_dsn, tmp_path)
    api = await aiohttp_client(create_app(config_module.from_dict(config)))
    token = await owner_token(outage_dsn)
    cron_id = await hook_and_cron(api, token, receiver)
    conn = await asyncpg.connect(outage_dsn)
    try:  # due already: the scheduler is to fire it as soon as it can
        await conn.execute("UPDATE crons SET next_run = now() - interval '1 minute'")
    finally:
        await conn.close()
    await queue_delivery(api, token)
    await stop_database(outage_cluster)

    process = start("scheduler", config)
    await waiting(process, "scheduler", config)
    await start_database(outage_cluster)

    async def delivered() -> bool:
        return bool(receiver.got)

    async def fired() -> bool:
        return await runs_and_builds(outage_dsn, cron_id) == (1, 1)

    await until("the delivery", delivered)
    await until("the cron build", fired)
    assert process.running(), process.text()
    assert await process.terminate() == 0, process.text()
    assert await runs_and_builds(outage_dsn, cron_id) == (1, 1)
    assert len(receiver.got) == 1
    log = process.text()
    assert log.count("waiting for the database") == 1, log
    assert "database available" in log
    assert "Traceback" not in log


@pytest.mark.docker
@pytest.mark.usefixtures("docker_engine")
async def test_a_runner_started_before_the_database_runs_a_build_once_it_is_up(
    aiohttp_client: Client,
    outage_cluster: Cluster,
    outage_dsn: str,
    tmp_path: Path,
    start: Callable[[str, dict[str, Any]], Process],
):
    host = os.environ.get("DOCKER_HOST", config_module.DockerConfig.host)
    config = {**settings(outage_dsn, tmp_path), "docker": {"pull": "never", "host": host}}
    await stop_database(outage_cluster)
    process = start("runner", config)
    await waiting(process, "runner", config)
    await start_database(outage_cluster)

    api = await aiohttp_client(create_app(config_module.from_dict(config)))
    token = await owner_token(outage_dsn)
    headers = {"Authorization": f"Bearer {token}"}
    resp = await api.post("/api/builds", headers=headers, json={"manifest": MANIFEST})
    assert resp.status == 201, await resp.text()
    build_id = (await resp.json())["id"]

    async def status() -> str | None:
        conn = await asyncpg.connect(outage_dsn)
        try:
            found = await conn.fetchval("SELECT status FROM builds WHERE id = $1", build_id)
        finally:
            await conn.close()
        return found if found not in ("queued", "running") else None

    await until("the build to end", status)
    assert await status() == "passed", process.text()
    assert await process.terminate() == 0, process.text()
    log = process.text()
    assert log.count("waiting for the database") == 1, log
    assert "Traceback" not in log


async def test_serve_started_before_the_database_answers_503_then_ok_without_a_restart(
    outage_cluster: Cluster,
    outage_dsn: str,
    tmp_path: Path,
    start: Callable[[str, dict[str, Any]], Process],
):
    await stop_database(outage_cluster)
    config = serving(outage_dsn, tmp_path)
    process = start("serve", config)
    await waiting(process, "serve", config)
    answer = await health(config)
    assert answer is not None
    status, body = answer
    assert (status, body["status"], body["reason"]) == (503, "unavailable", "not reachable")

    await start_database(outage_cluster)

    async def healthy() -> bool:
        return await health(config) == (200, {"status": "ok", "database": "ok", "version": "0.1.0"})

    await until("serve to answer 200", healthy)
    assert process.running(), process.text()
    assert await process.terminate() == 0, process.text()
    assert "Traceback" not in process.text()


async def test_up_with_a_database_that_is_not_up_yet_waits_then_migrates_and_serves(
    outage_cluster: Cluster,
    outage_dsn: str,
    tmp_path: Path,
    start: Callable[[str, dict[str, Any]], Process],
):
    await stop_database(outage_cluster)
    config = settings(outage_dsn, tmp_path)
    del config["server"]  # `marid up` fills it in from --port
    process = start("up", config)
    await waiting(process, "up", config)
    await start_database(outage_cluster)
    await process.logged("marid is up")
    api = next(line.split()[-1] for line in process.text().splitlines() if "API:" in line)

    async def healthy() -> bool:
        answer = await health({"server": {"url": api.removesuffix("/api")}})
        return answer is not None and answer[0] == 200

    await until("up to answer 200", healthy)
    assert await process.terminate() == 0, process.text()
    log = process.text()
    assert log.count("waiting for the database") == 1, log
    assert "Traceback" not in log


@pytest.mark.parametrize("command", ["scheduler", "runner", "serve"])
async def test_a_database_that_refuses_the_login_is_not_waited_for_it_exits_3(
    command: str,
    outage_dsn: str,
    tmp_path: Path,
    start: Callable[[str, dict[str, Any]], Process],
):
    wrong = re.sub(r"(//[^:/]+:)[^@]*@", r"\1not-the-password@", outage_dsn)
    assert wrong != outage_dsn
    config = serving(wrong, tmp_path)
    process = start(command, config)
    status = await asyncio.to_thread(process.proc.wait, WAIT)
    assert status == 3, process.text()
    assert "marid: database error: password authentication failed" in process.text()
    assert "waiting for the database" not in process.text()
