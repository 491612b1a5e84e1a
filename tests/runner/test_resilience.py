"""A runner against real faults (issue 10 parts 1 and 2; docs/manifest.md §6.13): PostgreSQL
stopped and started under it, a blob store whose directory cannot be written, a kill asked
while its connections were down. No part of marid is mocked.

These tests stop PostgreSQL, so they run on a cluster of their own (tests/fixtures/outage.py),
never the session's shared one. Jobs wait on gate files that the test opens; every wait is
bounded and no test asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncpg
import docker
import pytest

from marid import config as config_module
from marid import db, lifecycle, manifest, users
from marid.blobs import open_store
from marid.listen import UNAVAILABLE
from marid.pgcluster import Cluster
from marid.runner.worker import Worker, instance_of
from marid.submit import Submission, submit
from marid.users import User
from tests.fixtures.outage import start_database, stop_database

WAIT, STEP = 120.0, 0.05  # seconds: a generous bound on every wait, and the polling step
FINAL = ("passed", "passed_with_failures", "failed", "killed", "timed_out")


def gated(gate: Path, log: Path, artifact: bool = False) -> str:
    """A one-job os build that records its start in `log`, fails if an earlier attempt's shell
    is still alive, waits for `gate`, records its end, and optionally makes an artifact."""
    commands = [
        f"if [ -e {log}.pid ] && kill -0 $(cat {log}.pid); then echo TWICE >> {log}; fi",
        f"echo $$ > {log}.pid; echo start >> {log}",
        f"trap 'echo stopped >> {log}; exit 143' TERM; until [ -e {gate} ]; do sleep 0.05; done",
        f"echo end >> {log}; echo made > out.txt",
    ]
    text = "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands:\n"
    text += "".join(f"  - {json.dumps(command)}\n" for command in commands)
    if artifact:
        text += "  artifacts: [out.txt]\n"
    return text


ARTIFACT = """\
driver: {type: os}
stages: [s]
jobs:
- stage: s
  commands: [echo made > out.txt]
  artifacts: [out.txt]
"""
FAILING = "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands: [exit 3]\n"
QUICK = "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands: [echo quick]\n"


class Runner:
    """A Worker running in this process against the module's own cluster, with a pool of its
    own as `marid runner` has."""

    def __init__(self, dsn: str, tmp_path: Path, runner: dict[str, Any]) -> None:
        drivers = runner.pop("drivers", ["os"])
        engine = runner.pop("docker_host", "unix:///var/run/docker.sock")
        self.config = config_module.from_dict(
            {
                "server": {"url": "https://ci.example.com"},
                "database": {"dsn": dsn},
                "crypto": {"key": "test-crypto-key-" + "0" * 32},
                "drivers": drivers,
                "docker": {"network": "none", "pull": "never", "host": engine},
                "storage": {"backend": "fs", "path": str(tmp_path / "blobs")},
                "runner": {"parallelism": 1, **runner},
            }
        )
        self.stop = asyncio.Event()
        self.worker: Worker | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Worker:
        self.pool = await db.create_pool(self.config.database.dsn, 4)
        self.blobs = open_store(self.config.storage)
        self.worker = Worker(self.config, self.pool, self.blobs)
        self.task = asyncio.create_task(self.worker.run(self.stop))
        return self.worker

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            task, self.task = self.task, None
            await asyncio.wait_for(task, WAIT)
            await self.blobs.close()
            await self.pool.close()


@pytest.fixture
async def start_runner(outage_dsn: str, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await start_runner(lease="2s", …)`: a running Worker; stopped when the test ends."""
    runners: list[Runner] = []

    async def start(**runner: Any) -> Runner:
        started = Runner(outage_dsn, tmp_path, runner)
        runners.append(started)
        await started.start()
        return started

    yield start
    for runner in runners:
        await runner.close()


@pytest.fixture
async def alice(outage_dsn: str) -> User:
    conn = await asyncpg.connect(outage_dsn)
    try:
        return await users.create(conn, "alice", "alice@example.com", "password1")
    finally:
        await conn.close()


async def queue(dsn: str, owner: User, text: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            build = await submit(conn, Submission(owner, owner, None, manifest.parse(text)))
    finally:
        await conn.close()
    return build.id


async def query(dsn: str, sql: str, *args: Any) -> Any:
    """One row of `sql` on a fresh connection; None while the database is away."""
    try:
        conn = await asyncpg.connect(dsn)
    except UNAVAILABLE:
        return None
    try:
        return await conn.fetchrow(sql, *args)
    except UNAVAILABLE:
        return None
    finally:
        with contextlib.suppress(*UNAVAILABLE):
            await conn.close()


async def until(what: str, condition: Callable[[], Awaitable[Any]]) -> Any:
    """Poll `condition` until it returns something true; fail naming `what` after WAIT."""
    for _ in range(int(WAIT / STEP)):
        result = await condition()
        if result:
            return result
        await asyncio.sleep(STEP)
    raise AssertionError(f"still waiting after {WAIT:g}s for {what}")


# The build's output is its jobs' joined (docs/api.md §7.1); these jobs' fit in their rows.
BUILD = """
SELECT b.status, b.attempt, b.retry_reason,
       (SELECT string_agg(coalesce(j.output, ''), '' ORDER BY s.position, j.position)
        FROM build_jobs j JOIN build_stages s ON s.id = j.stage_id
        WHERE j.build_id = b.id) AS output
FROM builds b WHERE b.id = $1
"""


async def ended(dsn: str, build_id: int) -> asyncpg.Record:
    """The build's row once it has a final status."""

    async def final() -> Any:
        row = await query(dsn, BUILD, build_id)
        return row if row is not None and row["status"] in FINAL else None

    row: asyncpg.Record = await until(f"build {build_id} to end", final)
    return row


async def logged(path: Path, line: str) -> bool:
    return path.exists() and line in path.read_text().splitlines()


def runner_messages(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "marid.runner.worker"
        and ("retrying with backoff" in r.getMessage() or "working again" in r.getMessage())
    ]


async def test_a_short_outage_mid_build_and_while_idle_costs_nothing(
    start_runner: Callable[..., Any],
    outage_cluster: Cluster,
    outage_dsn: str,
    alice: User,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO)
    runner = await start_runner()  # the default lease, 30 s, outlasts the outage
    gate, log = tmp_path / "gate", tmp_path / "job.log"
    build_id = await queue(outage_dsn, alice, gated(gate, log, artifact=True))
    await until("the job to start", lambda: logged(log, "start"))

    await stop_database(outage_cluster)  # mid-build: the heartbeat's renewals fail
    runner.worker.wake.set()  # and the loop looks at the queue while the database is away
    await until("the loop to fail", lambda: _true(bool(runner_messages(caplog))))
    await asyncio.sleep(2)  # the runner keeps retrying meanwhile
    await start_database(outage_cluster)
    gate.touch()
    row = await ended(outage_dsn, build_id)
    assert (row["status"], row["attempt"]) == ("passed", 1), row["output"]
    assert "marid: attempt" not in row["output"]
    assert log.read_text().splitlines() == ["start", "end"]

    await stop_database(outage_cluster)  # idle
    runner.worker.wake.set()
    await asyncio.sleep(2)
    await start_database(outage_cluster)
    after = [await queue(outage_dsn, alice, QUICK) for _ in range(2)]
    for build_id in after:
        row = await ended(outage_dsn, build_id)
        assert (row["status"], row["attempt"]) == ("passed", 1), row["output"]
    assert runner.task is not None and not runner.task.done()
    messages = runner_messages(caplog)
    levels = [level for level, _ in messages]
    assert levels[0] == "WARNING" and levels.count("WARNING") == levels.count("INFO") >= 1
    assert all(a != b for a, b in itertools.pairwise(levels)), messages
    artifact = await query(outage_dsn, "SELECT size FROM build_artifacts")
    assert artifact["size"] == len("made\n")


async def _true(value: bool) -> bool:
    return value


DOCKER_GATED = """\
driver: {type: docker, image: marid-test/busybox:latest, workspace: /workspace}
stages: [s]
jobs:
- stage: s
  commands:
  - echo waiting
  - until [ -e gate ]; do sleep 0.05; done
  - echo made > out.txt
  artifacts: [out.txt]
"""


@pytest.mark.docker
async def test_a_short_outage_mid_docker_build_costs_nothing(
    start_runner: Callable[..., Any],
    outage_cluster: Cluster,
    outage_dsn: str,
    alice: User,
    docker_engine: docker.DockerClient,
):
    await start_runner(drivers=["docker"])
    build_id = await queue(outage_dsn, alice, DOCKER_GATED)
    labels = [f"marid.build={build_id}", f"marid.instance={instance_of(outage_dsn)}"]

    async def job_container() -> Any:
        found = await asyncio.to_thread(
            docker_engine.containers.list, filters={"label": [*labels, "marid.job=s.1"]}
        )
        return found[0] if found else None

    container = await until("the job's container to run", job_container)
    await stop_database(outage_cluster)
    await asyncio.sleep(2)  # the runner keeps renewing meanwhile
    await start_database(outage_cluster)
    await asyncio.to_thread(container.exec_run, ["touch", "/workspace/gate"])
    row = await ended(outage_dsn, build_id)
    assert (row["status"], row["attempt"]) == ("passed", 1), row["output"]
    assert "marid: attempt" not in row["output"]
    left = await asyncio.to_thread(
        docker_engine.containers.list, all=True, filters={"label": labels}
    )
    assert left == []


async def test_an_outage_longer_than_the_lease_stops_the_job_and_retries_it(
    start_runner: Callable[..., Any],
    outage_cluster: Cluster,
    outage_dsn: str,
    alice: User,
    tmp_path: Path,
):
    await start_runner(lease="2s")
    gate, log = tmp_path / "gate", tmp_path / "job.log"
    build_id = await queue(outage_dsn, alice, gated(gate, log))
    await until("the job to start", lambda: logged(log, "start"))

    await stop_database(outage_cluster)
    # Stopped by its own runner while the database is still away: no other runner could have
    # recovered the build yet.
    await until("the runner to stop its job", lambda: logged(log, "stopped"))
    gate.touch()
    await start_database(outage_cluster)
    row = await ended(outage_dsn, build_id)
    assert (row["status"], row["attempt"]) == ("passed", 2), row["output"]
    assert row["output"].startswith("marid: attempt 2 (attempt 1: runner lost its lease"), row[
        "output"
    ]
    assert log.read_text().splitlines() == ["start", "stopped", "start", "end"]  # never TWICE
    assert await query(outage_dsn, "SELECT 1 FROM build_tags WHERE name = 'orphaned'")


@contextlib.contextmanager
def immutable(directory: Path) -> Any:
    """`directory` cannot be written, even by root, until the block ends."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chattr", "+i", str(directory)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


async def test_a_blob_store_that_cannot_be_written_fails_the_build_after_max_attempts(
    start_runner: Callable[..., Any], outage_dsn: str, alice: User, tmp_path: Path
):
    runner = await start_runner(max_attempts=3, retry_delay="1s")
    with immutable(Path(runner.config.storage.path)):
        build_id = await queue(outage_dsn, alice, ARTIFACT)
        row = await ended(outage_dsn, build_id)
    assert (row["status"], row["attempt"]) == ("failed", 3), row["output"]
    assert row["output"].startswith("marid: attempt 3 (attempt 2: storing artifact out.txt: ")
    assert row["output"].endswith(
        "Collecting artifact out.txt => out.txt\n"
        "marid: attempt 3 of 3 failed: storing artifact out.txt:"
        " [Errno 1] Operation not permitted; giving up\n"
    )
    jobs = await query(
        outage_dsn,
        "SELECT array_agg(status ORDER BY id) AS s FROM build_jobs WHERE build_id = $1",
        build_id,
    )
    assert jobs["s"] == ["passed", "failed"]
    assert await query(outage_dsn, "SELECT 1 FROM builds WHERE status = 'running'") is None


async def test_a_blob_store_fault_that_clears_before_the_last_attempt_ends_passed(
    start_runner: Callable[..., Any], outage_dsn: str, alice: User, tmp_path: Path
):
    runner = await start_runner(max_attempts=3, retry_delay="5s")
    with immutable(Path(runner.config.storage.path)):
        build_id = await queue(outage_dsn, alice, ARTIFACT)
        await until(
            "the first attempt to fail",
            lambda: query(
                outage_dsn,
                "SELECT 1 FROM builds WHERE id = $1 AND retry_reason IS NOT NULL",
                build_id,
            ),
        )
    row = await ended(outage_dsn, build_id)  # the fault cleared before attempt 2 began
    assert (row["status"], row["attempt"]) == ("passed", 2), row["output"]
    assert row["output"].startswith(
        "marid: attempt 2 (attempt 1: storing artifact out.txt:"
        " [Errno 1] Operation not permitted)\n"
    )
    artifact = await query(outage_dsn, "SELECT size FROM build_artifacts")
    assert artifact["size"] == len("made\n")


async def test_a_masked_value_that_does_not_decrypt_is_retried_then_fails_the_build(
    start_runner: Callable[..., Any], outage_dsn: str, alice: User
):
    build_id = await queue(outage_dsn, alice, QUICK)
    conn = await asyncpg.connect(outage_dsn)
    try:  # sealed with another key, or tampered with: the runner cannot decrypt it
        await conn.execute(
            "INSERT INTO build_variables (build_id, key, value_sealed, masked, position)"
            " VALUES ($1, 'SECRET', $2, true, 0)",
            build_id,
            b"not a sealed value",
        )
    finally:
        await conn.close()
    await start_runner(max_attempts=2, retry_delay="1s")
    row = await ended(outage_dsn, build_id)
    assert (row["status"], row["attempt"]) == ("failed", 2), row["output"]
    first, *_, last = row["output"].splitlines()
    assert first.startswith("marid: attempt 2 (attempt 1: preparing the build: ")
    assert last.startswith("marid: attempt 2 of 2 failed: preparing the build: ")
    assert last.endswith("; giving up")
    assert "not a sealed value" not in row["output"]


async def test_the_runner_reaper_sweeps_at_start(start_runner: Callable[..., Any], outage_dsn: str):
    old = Path(tempfile.mkdtemp(prefix="marid-scripts-"))  # a dead runner's, a year ago
    os.utime(old, (time.time() - 365 * 86400,) * 2)
    await start_runner()
    await until("the reaper to remove it", lambda: _true(not old.exists()))


async def test_a_failing_user_command_is_never_retried(
    start_runner: Callable[..., Any], outage_dsn: str, alice: User
):
    await start_runner(max_attempts=3, retry_delay="1s")
    build_id = await queue(outage_dsn, alice, FAILING)
    row = await ended(outage_dsn, build_id)
    assert (row["status"], row["attempt"], row["retry_reason"]) == ("failed", 1, None)
    assert row["output"].endswith("+ exit 3\nexit status 3\n")


async def test_a_kill_asked_while_the_runner_was_disconnected_stops_the_job_after_it_reconnects(
    start_runner: Callable[..., Any],
    outage_cluster: Cluster,
    outage_dsn: str,
    alice: User,
    tmp_path: Path,
):
    await start_runner()
    gate, log = tmp_path / "gate", tmp_path / "job.log"
    build_id = await queue(outage_dsn, alice, gated(gate, log))
    await until("the job to start", lambda: logged(log, "start"))
    name = outage_dsn.rsplit("/", 1)[1]
    ours = await asyncpg.connect(outage_dsn)  # opened before: it outlives what follows
    admin = await asyncpg.connect(outage_cluster.dsn())
    try:
        # The runner loses every connection (its LISTEN too) and cannot open new ones, so it
        # misses the kill's NOTIFY.
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> $2",
            name,
            ours.get_server_pid(),
        )
        async with ours.transaction():
            assert not await lifecycle.kill(ours, build_id)
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
        await ours.close()
    row = await ended(outage_dsn, build_id)
    assert (row["status"], row["attempt"]) == ("killed", 1), row["output"]
    assert row["output"].endswith("killed on request\n")
    assert "end" not in log.read_text().splitlines()


class EngineLine:
    """The runner's way to the Docker engine: a UNIX socket passing bytes to the engine's, which
    the test cuts (every connection closed, no new one accepted) and mends. It runs on an event
    loop of its own, in a thread, as an engine runs apart from the runner."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.AbstractServer | None = None
        self.pipes: set[asyncio.Task[None]] = set()

    async def mend(self) -> None:
        await self._call(self._mend())

    async def cut(self) -> None:
        await self._call(self._cut())

    async def close(self) -> None:
        if self.server is not None:
            await self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self.thread.join)
        self.loop.close()

    async def _call(self, work: Coroutine[Any, Any, None]) -> None:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self.loop))

    async def _mend(self) -> None:
        self.server = await asyncio.start_unix_server(self._connected, path=str(self.path))

    async def _cut(self) -> None:
        assert self.server is not None
        self.server.close()
        self.server = None
        self.path.unlink()
        for pipe in self.pipes:
            pipe.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        engine_reader, engine_writer = await asyncio.open_unix_connection("/var/run/docker.sock")
        pipes = [
            asyncio.create_task(_pipe(reader, engine_writer)),
            asyncio.create_task(_pipe(engine_reader, writer)),
        ]
        self.pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self.pipes.difference_update(pipes)
            for end in (writer, engine_writer):
                end.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


# docker-py leaves the socket of a refused connection to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.docker
async def test_an_engine_that_stops_answering_mid_job_is_retried_as_a_new_attempt(
    start_runner: Callable[..., Any],
    outage_dsn: str,
    alice: User,
    docker_engine: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
):
    """docs/manifest.md §6.13: no Docker engine answering during a job ends the attempt, not
    the job; the next attempt removes the first one's container and runs the job again."""
    line = EngineLine(Path(tempfile.mkdtemp(prefix="marid-engine-")) / "docker.sock")
    await line.mend()
    runner = await start_runner(
        drivers=["docker"], docker_host=f"unix://{line.path}", retry_delay="2s"
    )
    try:
        await _engine_cut_mid_job(outage_dsn, alice, docker_engine, line)
    finally:
        await runner.close()  # with the refused connections it holds, collected below
        await line.close()
        shutil.rmtree(line.path.parent, ignore_errors=True)
        # The sockets live in the frames of logged exceptions (the driver logs its failed
        # clean-up with its traceback): let them go now, under this test's warning filter.
        for record in caplog.records:
            error = record.exc_info[1] if record.exc_info else None
            while error is not None:
                traceback.clear_frames(error.__traceback__)
                error = error.__cause__ or error.__context__
        gc.collect()


async def _engine_cut_mid_job(
    outage_dsn: str,
    alice: User,
    docker_engine: docker.DockerClient,
    line: EngineLine,
) -> None:
    build_id = await queue(outage_dsn, alice, DOCKER_GATED)
    labels = [f"marid.build={build_id}", f"marid.instance={instance_of(outage_dsn)}"]

    async def job_container(attempt: int) -> Any:
        found = await asyncio.to_thread(
            docker_engine.containers.list,
            filters={"label": [*labels, f"marid.attempt={attempt}", "marid.job=s.1"]},
        )
        return found[0] if found else None

    await until("attempt 1's job to run", lambda: job_container(1))
    await line.cut()
    await until(
        "attempt 1 to be handed back",
        lambda: query(
            outage_dsn,
            "SELECT 1 FROM builds WHERE id = $1 AND status = 'queued' AND retry_reason IS NOT NULL",
            build_id,
        ),
    )
    await line.mend()
    container = await until("attempt 2's job to run", lambda: job_container(2))
    await asyncio.to_thread(container.exec_run, ["touch", "/workspace/gate"])

    row = await ended(outage_dsn, build_id)
    assert (row["status"], row["attempt"]) == ("passed", 2), row["output"]
    first_line = row["output"].splitlines()[0]
    assert first_line.startswith("marid: attempt 2 (attempt 1: "), row["output"]
    left = await asyncio.to_thread(
        docker_engine.containers.list, all=True, filters={"label": labels}
    )
    assert left == []  # attempt 1's container, still waiting at its gate, went too
