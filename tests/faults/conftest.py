"""The fault tests' harness (issue 10 part 8): a whole installation as real processes.

`start_marid(dsn, **sections)` writes a configuration file, starts `marid serve` on a free
loopback port, two `marid runner`s and `marid scheduler` as child processes, waits until the
API answers and returns an `Installation`: HTTP helpers with a token of alice's, kill -9 and
SIGTERM of one process, a restart, and what the processes left behind. Every process writes
its log to a file of its own; a failing test shows the end of each log in its report. Teardown
stops every process, removes the containers and volumes labelled for the installation and
deletes its blob store and temporary directory.

The storage fault tests take over 80 s each, so they run in the background while the other
tests of this package run (`storage_faults`), on an installation of their own: a database on
the session's cluster (never stopped), their own directory, ports and instance label.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import docker
import pytest
import yaml
from docker.errors import APIError, NotFound

from marid import scopes, tokens, users
from marid.pgcluster import Cluster, free_port
from marid.runner.worker import instance_of
from marid.uploads import SPOOL
from tests.fixtures.clusters import copy_database
from tests.runner import conftest as runner_fixtures

# The session's Docker engine with the test images (skips, or fails under CI, without one).
docker_engine = runner_fixtures.docker_engine

MARID = str(Path(sys.executable).with_name("marid"))  # the console script in .venv/bin
CRYPTO_KEY = "fault-test-crypto-key-" + "0" * 32
SCOPE = (
    "build:read,write,delete object:read,write namespace:read,write webhook:read,write "
    "variable:read,write"
)
PROCESSES = {"serve": "serve", "runner-1": "runner", "runner-2": "runner", "scheduler": "scheduler"}
WAIT = 120.0  # seconds: the bound on any wait that has no bound of its own
STEP = 0.1  # seconds between two looks at something another process changes
LOG_TAIL = 150  # lines of each process's log in the report of a failing test
FINAL = ("passed", "passed_with_failures", "failed", "killed", "timed_out")

INSTALLATIONS = pytest.StashKey[list["Installation"]]()
_numbers = itertools.count()


async def until(what: str, condition: Callable[[], Awaitable[Any]], bound: float = WAIT) -> Any:
    """Poll the coroutine `condition()` until it returns something true, and return that; fail
    naming `what` after `bound` seconds."""
    deadline = time.monotonic() + bound
    while True:
        found = await condition()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {bound:g}s for {what}")
        await asyncio.sleep(STEP)


class Installation:
    """serve, two runners and a scheduler on one database and one blob store directory."""

    def __init__(
        self, directory: Path, dsn: str, sections: dict[str, Any], engine: docker.DockerClient
    ) -> None:
        self.directory = directory
        self.engine = engine
        self.dsn = dsn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.blobs = directory / "blobs"
        self.temp = directory / "tmp"  # $TMPDIR of every process: spool and runner files
        self.instance = instance_of(dsn)  # the label of the containers the runners make
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.exits: dict[str, list[int]] = {}  # how each process ended, in order
        self.token = ""
        self.session: aiohttp.ClientSession | None = None
        self.blobs.mkdir(parents=True)
        self.temp.mkdir()
        self.config = directory / "marid.yml"
        self.config.write_text(yaml.safe_dump(self._settings(sections)))

    def _settings(self, sections: dict[str, Any]) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "server": {"url": f"http://127.0.0.1:{self.port}", "listen": f"127.0.0.1:{self.port}"},
            "database": {"dsn": self.dsn, "pool_size": 4},
            "crypto": {"key": CRYPTO_KEY},
            "drivers": ["docker"],
            "docker": {"pull": "never", "network": "none"},
            "objects": {"max_size": "1g"},
            "rate_limit": {"enabled": False},
            "storage": {"backend": "fs", "path": str(self.blobs)},
            "logging": {"level": "info"},
            # What a failed build leaves is checked here: it keeps no workspace for resuming
            # (tests/runner/test_resume.py checks that a kept one is removed in the end).
            "builds": {"keep_workspace": 0},
        }
        for name, section in sections.items():
            settings[name] = {**settings.get(name, {}), **section}
        return settings

    # --- processes ------------------------------------------------------------------------

    def log(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def start(self, name: str) -> None:
        """Start (or start again) the process `name` (serve, runner-1, runner-2, scheduler)."""
        assert self.processes.get(name) is None or self.processes[name].poll() is not None
        env = {**os.environ, "TMPDIR": str(self.temp)}
        env.pop("MARID_CONFIG", None)
        with self.log(name).open("ab") as log:
            log.write(f"--- marid {PROCESSES[name]} started at {time.time():.3f}\n".encode())
            log.flush()
            self.processes[name] = subprocess.Popen(
                [MARID, "--config", str(self.config), PROCESSES[name]],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    async def start_all(self) -> None:
        for name in PROCESSES:
            self.start(name)
        await self.serving()
        self.token = await self.make_token()

    async def serving(self) -> None:
        """Return once serve answers /health with 200."""

        async def healthy() -> bool:
            self.assert_running("serve")
            with contextlib.suppress(aiohttp.ClientError):
                async with self.http.get(f"{self.url}/health") as resp:
                    return resp.status == 200
            return False

        await until("marid serve to answer /api/health", healthy)

    def assert_running(self, *names: str) -> None:
        for name in names or tuple(self.processes):
            status = self.processes[name].poll()
            assert status is None, f"marid {name} exited with status {status}"

    def kill(self, name: str) -> None:
        """kill -9: nothing of the process's own clean-up runs."""
        self._signal(name, signal.SIGKILL, 30)

    def terminate(self, name: str, bound: float = 30) -> None:
        """SIGTERM, and wait for the process to end; kill -9 after `bound` seconds."""
        self._signal(name, signal.SIGTERM, bound)

    def _signal(self, name: str, sig: signal.Signals, bound: float) -> None:
        if self.processes[name].poll() is None:
            self.processes[name].send_signal(sig)
        self._wait(name, bound)

    def _wait(self, name: str, bound: float) -> None:
        """Wait for the process to end; kill -9 after `bound` seconds. Records its status."""
        process = self.processes[name]
        try:
            process.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        self.exits.setdefault(name, []).append(process.returncode)

    async def runner_of(self, build: dict[str, Any]) -> str:
        """The name (runner-1, runner-2) of the process running `build` now."""
        conn = await asyncpg.connect(self.dsn)
        try:
            claimed = await conn.fetchval("SELECT runner FROM builds WHERE id = $1", build["id"])
        finally:
            await conn.close()
        for name, process in self.processes.items():
            if name.startswith("runner") and str(claimed).endswith(f"-{process.pid}"):
                return name
        raise AssertionError(f"build {build['number']} is run by {claimed!r}, no runner of ours")

    async def close(self) -> None:
        """Stop every process, then remove what the installation made outside its directory."""
        await asyncio.to_thread(self.stop_all, 10)
        if self.session is not None:
            await self.session.close()
        await asyncio.to_thread(self.remove_engine_leftovers)
        await asyncio.to_thread(self.remove_files)

    def remove_files(self) -> None:
        """The blob store and the temporary directory, whatever a test left immutable or
        mounted there."""
        subprocess.run(["umount", str(self.blobs)], capture_output=True, check=False)
        for directory in (self.blobs, self.temp):
            subprocess.run(["chattr", "-R", "-i", str(directory)], capture_output=True, check=False)
            shutil.rmtree(directory, ignore_errors=True)

    def stop_all(self, bound: float) -> None:
        """SIGTERM to every process at once; kill -9 those still there after `bound` seconds
        (a runner waits for its builds to end)."""
        running = [name for name, process in self.processes.items() if process.poll() is None]
        for name in running:
            self.processes[name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + bound
        for name in running:  # one SIGTERM each: a second may land after the handler is gone
            self._wait(name, max(0.1, deadline - time.monotonic()))

    def remove_engine_leftovers(self) -> None:
        for container in self.engine.containers.list(all=True, filters=self._label()):
            with contextlib.suppress(NotFound, APIError):
                container.remove(force=True)
        for volume in self.engine.volumes.list(filters=self._label()):
            with contextlib.suppress(NotFound, APIError):
                volume.remove(force=True)

    def _label(self, **more: object) -> dict[str, list[str]]:
        labels = [f"marid.instance={self.instance}"]
        labels += [f"marid.{key}={value}" for key, value in more.items()]
        return {"label": labels}

    def report(self) -> Iterator[tuple[str, str]]:
        """(title, the end of its log) of every process, for a failing test's report."""
        for name in self.processes:
            lines = self.log(name).read_text(errors="replace").splitlines()
            exits = self.exits.get(name, [])
            status = self.processes[name].poll()
            title = f"marid {name} (pid {self.processes[name].pid}, exits {exits}, now {status})"
            yield title, "\n".join(lines[-LOG_TAIL:])

    # --- the engine ------------------------------------------------------------------------

    def containers(self, status: str = "", **labels: object) -> list[Any]:
        """The installation's containers that carry `labels` (`build=…`, `job=…`), in any
        state or in `status` (`running`)."""
        filters = self._label(**labels)
        if status:
            filters["status"] = [status]
        return list(self.engine.containers.list(all=True, filters=filters))

    def engine_leftovers(self) -> list[str]:
        containers = self.engine.containers.list(all=True, filters=self._label())
        volumes = self.engine.volumes.list(filters=self._label())
        return [f"container {c.name}" for c in containers] + [f"volume {v.name}" for v in volumes]

    # --- HTTP --------------------------------------------------------------------------------

    @property
    def http(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        return self.session

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def make_token(self) -> str:
        """alice (created now) and a token of hers with SCOPE, straight in the database."""
        conn = await asyncpg.connect(self.dsn)
        try:
            alice = await users.create(conn, "alice", "alice@example.com", "password1")
            _, value = await tokens.create(conn, alice, "faults", scopes.parse(SCOPE))
        finally:
            await conn.close()
        return value

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """(status, JSON body or text) of `method` on the API path `path` (`/builds`)."""
        url = path if path.startswith("http") else self.url + path
        async with self.http.request(method, url, headers=self.headers, **kwargs) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def submit(self, manifest: str) -> dict[str, Any]:
        status, body = await self.request("POST", "/builds", json={"manifest": manifest})
        assert status == 201, (status, body)
        return dict(body)

    async def build(self, build: dict[str, Any]) -> dict[str, Any]:
        status, body = await self.request("GET", f"/b/alice/{build['number']}")
        assert status == 200, (status, body)
        return dict(body)

    async def finished(self, build: dict[str, Any], bound: float = WAIT) -> dict[str, Any]:
        """The build once it has a final status."""

        async def final() -> dict[str, Any] | None:
            body = await self.build(build)
            return body if body["status"] in FINAL else None

        found: dict[str, Any] = await until(f"build {build['number']} to end", final, bound)
        return found

    async def job_output(self, build: dict[str, Any], job: str) -> str:
        """The job's output: what it wrote so far while it runs, all of it once it ended."""
        status, text = await self.request("GET", f"/b/alice/{build['number']}/jobs/{job}/output")
        assert status == 200, (status, text)
        return str(text)

    async def until_output(self, build: dict[str, Any], job: str, text: str) -> None:
        async def seen() -> bool:
            return text in await self.job_output(build, job)

        await until(f"{text!r} in the output of {job} of build {build['number']}", seen)

    # --- what dead processes leave -------------------------------------------------------

    async def leftovers(self) -> list[str]:
        """Upload spool files, unfinished blobs, blobs no row references, and the containers
        and volumes of the installation (docs/configuration.md §1.3, `reaper`)."""
        found = [f"spool file {p.name}" for p in self.temp.glob(f"{SPOOL[0]}*{SPOOL[1]}")]
        found += [f"unfinished blob {p.name}" for p in self.blobs.glob("*/.*.part")]
        found += [f"orphan blob {key}" for key in await self.orphan_blobs()]
        return found + await asyncio.to_thread(self.engine_leftovers)

    async def orphan_blobs(self) -> list[str]:
        stored = {p.name for p in self.blobs.glob("*/*") if not p.name.startswith(".")}
        return sorted(stored - await self.referenced_blobs())

    async def referenced_blobs(self) -> set[str]:
        """Every blob key a row holds, in any column named blob_key or …_blob_key (the naming
        rule of migrations/0012_blob_key_indexes.sql)."""
        conn = await asyncpg.connect(self.dsn)
        try:
            columns = await conn.fetch(
                r"""
                SELECT c.table_name, c.column_name FROM information_schema.columns c
                JOIN information_schema.tables t USING (table_schema, table_name)
                WHERE t.table_type = 'BASE TABLE' AND c.table_schema = 'public'
                  AND (c.column_name = 'blob_key' OR c.column_name LIKE '%\_blob\_key')
                """
            )
            keys: set[str] = set()
            for table, column in columns:
                rows = await conn.fetch(f'SELECT "{column}" FROM "{table}"')
                keys.update(row[0] for row in rows if row[0])
        finally:
            await conn.close()
        return keys


Starter = Callable[..., Awaitable[Installation]]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failing test's report shows the end of every process's log."""
    report = yield
    if report.failed:
        for installation in item.stash.get(INSTALLATIONS, []):
            for title, text in installation.report():
                report.sections.append((title, text))
    return report


def attach(item: pytest.Item, installation: Installation) -> None:
    item.stash.setdefault(INSTALLATIONS, []).append(installation)


@pytest.fixture
async def start_marid(
    request: pytest.FixtureRequest, tmp_path: Path, docker_engine: docker.DockerClient
) -> AsyncIterator[Starter]:
    """`await start_marid(dsn, runner={"lease": "5s"}, …)`: a running installation on the
    database `dsn`, configured with these sections on top of the harness's own."""
    started: list[Installation] = []

    async def start(dsn: str, **sections: Any) -> Installation:
        directory = tmp_path / f"marid-{len(started)}"
        directory.mkdir()
        installation = Installation(directory, dsn, sections, docker_engine)
        started.append(installation)
        attach(request.node, installation)
        await installation.start_all()
        return installation

    yield start
    for installation in started:
        await installation.close()


@pytest.fixture
def shared_dsn(db_dsn: str) -> str:
    """A fresh database on the session's cluster, which no test stops."""
    return db_dsn


# --- the storage faults, run in the background -------------------------------------------


class StorageFaults:
    """The scenarios of tests/faults/test_storage_faults.py, started as tasks on the session's
    event loop when the package's first test starts; each test awaits its own."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.installations: dict[str, Installation] = {}


@pytest.fixture(scope="package", autouse=True)
async def storage_faults(
    request: pytest.FixtureRequest,
    pg_cluster: Cluster,
    template_db: str,
    tmp_path_factory: pytest.TempPathFactory,
    docker_engine: docker.DockerClient,
) -> AsyncIterator[StorageFaults]:
    """The storage fault scenarios of the selected tests of test_storage_faults.py, running
    in the background from the package's first test on; each on a database of its own on
    the session's cluster, which no test stops."""
    faults = StorageFaults()
    module = "tests.faults.test_storage_faults"
    wanted = {
        getattr(item, "originalname", item.name)
        for item in request.session.items
        if getattr(getattr(item, "module", None), "__name__", "") == module
    }
    # The faults need root (chattr, mount); without it the tests skip (test_storage_faults.py).
    scenarios = importlib.import_module(module).SCENARIOS if wanted and os.geteuid() == 0 else {}
    databases: list[str] = []
    for name in sorted(wanted & set(scenarios)):
        database = f"faults_storage_{os.getpid()}_{next(_numbers)}"
        admin = await asyncpg.connect(pg_cluster.dsn())
        try:
            await copy_database(admin, database, template_db)
        finally:
            await admin.close()
        databases.append(database)
        directory = tmp_path_factory.mktemp(f"storage-{name}")
        scenario = scenarios[name]
        installation = Installation(
            directory, pg_cluster.dsn(database), scenario.sections, docker_engine
        )
        faults.installations[name] = installation
        faults.tasks[name] = asyncio.create_task(scenario.run(installation))
    yield faults
    for task in faults.tasks.values():
        task.cancel()
    await asyncio.gather(*faults.tasks.values(), return_exceptions=True)
    for installation in faults.installations.values():
        await installation.close()
    admin = await asyncpg.connect(pg_cluster.dsn())
    try:
        for database in databases:
            await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    finally:
        await admin.close()
