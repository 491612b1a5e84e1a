"""Benchmark of a one-job docker build (issue 4): marid against a bare `docker run`.

A throwaway PostgreSQL cluster (durable settings) holds one migrated database with one user
and a full-scope token. `marid serve` and `marid runner` run as separate processes on a
loopback free port, with `drivers: [docker]` and `docker.network: none`. Two parts:

- latency, runner.parallelism 1: ROUNDS rounds, each timing (a) `docker run --rm --network
  none IMAGE true` and (b) one build of `true` from sending POST /builds to the build showing
  `passed` through GET /b/<user>/<n>, in ABBA order (a b, b a, ...);
- throughput, runner.parallelism P (the runner restarted): PAIRS pairs of batches in ABBA
  order, a batch being BUILDS `docker run`s P at a time, or BUILDS builds submitted at once,
  each timed until the last one is done.

Prints each round and batch with the machine's load during it, medians, p90, the overhead
b - a, the rates and their ratio, and where the time goes (database timestamps, the engine's
own event times and, with --trace, every docker API call and SQL statement of the runner).
Everything it started is stopped and removed on exit, Ctrl-C included.

    .venv/bin/python bench/runner.py [--rounds N] [--builds B] [--pairs P] [--trace]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import docker
from breakdown import (
    BARE_LABEL,
    BARE_STEPS,
    BUILD_STEPS,
    CLIENT_STEPS,
    SSE_STEPS,
    build_points,
    engine_times,
    p90,
    steps_table,
    trace_table,
)
from common import (
    BenchError,
    Process,
    cpu_model,
    create_database,
    guarded,
    marid_argv,
    postmaster_pid,
    throwaway_cluster,
    wait_serving,
    write_marid_config,
)
from docker.errors import DockerException
from machine import CLASSES, EngineEvents, Load, LoadMeter, ProcStat, load_text

from marid import db, scopes, tokens, users
from marid.pgcluster import Cluster, find_bindir, free_port

HERE = Path(__file__).resolve().parent
DATABASE = "marid_bench"
IMAGE = "marid-test/busybox:latest"
ENGINE = "unix:///var/run/docker.sock"  # marid's default docker.host
MANIFEST = f"""\
driver: {{type: docker, image: {IMAGE}, workspace: /w}}
stages: [s]
jobs:
  - stage: s
    commands: ["true"]
"""
JOB = "s.1"
BUILD_TIMEOUT = 120.0  # seconds one build or one `docker run` may take before the bench fails
READY_TIMEOUT = 30.0
RUNNER_READY = "runner bench: drivers"  # marid runner's first log line, once it listens
SETTLE = 0.25  # seconds between two timed operations, so one's tail is not in the next
DONE_POLL = 0.25  # seconds between checks that a throughput batch is finished


@dataclass
class Marid:
    """The two marid processes and how to reach the API."""

    serve: Process
    runner: Process
    port: int
    dsn: str
    token: str
    build_ids: Callable[[int], bool]  # whether a build id is one of this run's

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class BareRun:
    label: str
    spawned: float  # wall clock (time.time()) just before the docker CLI is started
    exited: float

    @property
    def seconds(self) -> float:
        return self.exited - self.spawned


@dataclass
class BuildRun:
    url: str
    build_id: int
    sent: float  # wall clock just before POST /builds is sent
    created: float = 0.0  # the 201 response arrived
    first_event: float = 0.0  # the first Server-Sent Event of job s.1 arrived
    job_done: float = 0.0  # the SSE `status` event of job s.1 arrived
    visible: float = 0.0  # GET /b/<user>/<n> answered `passed`
    polls: int = 0  # GETs of the build

    @property
    def seconds(self) -> float:
        return self.visible - self.sent

    def moments(self) -> dict[str, float]:
        return {
            "sent": self.sent,
            "first_event": self.first_event,
            "job_done": self.job_done,
            "visible": self.visible,
        }


# ---------------------------------------------------------------- set-up


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds (1-200)")
    parser.add_argument("--builds", type=int, default=200, help="throughput batch size (1-1000)")
    parser.add_argument(
        "--parallelism", type=int, default=2, help="runner.parallelism and bare runs at once (1-8)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each first (0-20)")
    parser.add_argument(
        "--poll-ms", type=int, default=5, help="GET interval once the job has finished (1-100)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="marid's logging.level (default: info, marid's own default)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=2,
        help="throughput batch pairs, ABBA order (0-5; 0: latency part only)",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="run the runner under bench/traced_runner.py and break its time down by call",
    )
    parser.add_argument(
        "--py-spy",
        metavar="PATH",
        help="py-spy binary: record the runner and the server during each part",
    )
    parser.add_argument(
        "--profile-dir",
        metavar="DIR",
        type=Path,
        help="where --py-spy writes its raw profiles (default: the current directory)",
    )
    args = parser.parse_args()
    for name, low, high in [
        ("rounds", 1, 200),
        ("builds", 1, 1000),
        ("parallelism", 1, 8),
        ("warmup", 0, 20),
        ("poll_ms", 1, 100),
        ("pairs", 0, 5),
    ]:
        if not low <= getattr(args, name) <= high:
            parser.error(f"--{name.replace('_', '-')} must be between {low} and {high}")
    return args


async def prepare(cluster: Cluster, first_build_id: int) -> str:
    """Create and migrate the database; returns the benchmark user's full-scope token."""
    await create_database(cluster, DATABASE)
    conn = await asyncpg.connect(cluster.dsn(DATABASE), server_settings={"timezone": "UTC"})
    try:
        await db.migrate(conn)
        # Container and volume names are marid-<build id>-<attempt>: starting far from 1 keeps
        # them apart from other sessions' test builds on the same engine.
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('builds', 'id'), $1, false)", first_build_id
        )
        user = await users.create(conn, "bench", "bench@example.com", "bench-password")
        _, value = await tokens.create(conn, user, "bench", scopes.FULL)
    finally:
        await conn.close()
    return value


def runner_process(
    directory: Path, dsn: str, port: int, parallelism: int, args: argparse.Namespace
) -> Process:
    """`marid runner` with a generated configuration; with --trace, bench/traced_runner.py."""
    path = write_marid_config(
        directory / f"runner-{parallelism}.yml",
        dsn,
        port,
        drivers=["docker"],
        docker={"host": ENGINE, "network": "none"},
        runner={"name": "bench", "parallelism": parallelism},
        storage={"path": str(directory / "blobs")},
        logging={"level": args.log_level},
    )
    log = directory / f"runner-{parallelism}.log"
    if not args.trace:
        return Process("marid runner", marid_argv("runner", path), log)
    argv = [sys.executable, str(HERE / "traced_runner.py"), "--config", str(path)]
    return Process("marid runner", argv, log, env={"MARID_BENCH_TRACE": str(trace_file(directory))})


def trace_file(directory: Path) -> Path:
    return directory / "trace.jsonl"


def start_runner(runner: Process) -> None:
    """Start the runner and wait until it listens for builds (its first log line)."""
    runner.start()
    runner.wait_for_line(RUNNER_READY, READY_TIMEOUT)


def start_marid(
    stack: contextlib.ExitStack,
    directory: Path,
    cluster: Cluster,
    args: argparse.Namespace,
    first_build_id: int,
) -> Marid:
    token = asyncio.run(prepare(cluster, first_build_id))
    dsn, port = cluster.dsn(DATABASE), free_port()
    path = write_marid_config(
        directory / "serve.yml",
        dsn,
        port,
        drivers=["docker"],
        storage={"path": str(directory / "blobs")},
        logging={"level": args.log_level},
    )
    serve = Process("marid serve", marid_argv("serve", path), directory / "serve.log")
    runner = runner_process(directory, dsn, port, 1, args)
    last = first_build_id + args.warmup + args.rounds + args.pairs * args.builds + 1000
    marid = Marid(
        serve, runner, port, dsn, token,
        lambda build_id: first_build_id <= build_id < last,
    )  # fmt: skip
    stack.callback(lambda: marid.serve.stop())
    stack.callback(lambda: marid.runner.stop())  # the one running at the time
    serve.start()
    start_runner(runner)
    return marid


def restart_runner(
    marid: Marid, directory: Path, parallelism: int, args: argparse.Namespace
) -> None:
    """Stop the runner (it finishes what it runs) and start one with `parallelism`."""
    marid.runner.stop()
    marid.runner = runner_process(directory, marid.dsn, marid.port, parallelism, args)
    start_runner(marid.runner)


def remove_leftovers(
    client: docker.DockerClient, session: str, ours: Callable[[int], bool]
) -> None:
    """Force-remove this run's containers and volumes, if any survived (Ctrl-C, errors)."""
    with contextlib.suppress(DockerException):
        for c in client.containers.list(all=True, filters={"label": f"{BARE_LABEL}"}):
            if c.labels.get(BARE_LABEL, "").startswith(session + "-"):
                c.remove(force=True)
        for c in client.containers.list(all=True, filters={"label": "marid.build"}):
            if ours(int(c.labels.get("marid.build", "0"))):
                c.remove(force=True)
        for v in client.volumes.list(filters={"label": "marid.build"}):
            if ours(int((v.attrs.get("Labels") or {}).get("marid.build", "0"))):
                v.remove(force=True)


def check_engine() -> docker.DockerClient:
    if shutil.which("docker") is None:
        raise BenchError("the docker CLI is not on PATH")
    try:
        client = docker.DockerClient(base_url=ENGINE)
        client.images.get(IMAGE)
    except DockerException as exc:
        raise BenchError(
            f"{IMAGE} is not available ({exc}): run scripts/docker-up and "
            "scripts/test-images --only busybox"
        ) from None
    return client


# ---------------------------------------------------------------- timed operations


async def bare_run(label: str) -> BareRun:
    """One `docker run --rm --network none IMAGE true`, timed from spawn to exit."""
    argv = ["docker", "run", "--rm", "--network", "none", "--label", f"{BARE_LABEL}={label}"]
    spawned = time.time()
    proc = await asyncio.create_subprocess_exec(
        *argv, IMAGE, "true", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), BUILD_TIMEOUT)
    except (TimeoutError, asyncio.CancelledError) as exc:  # cancelled: Ctrl-C
        proc.kill()
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise BenchError(f"docker run did not end within {BUILD_TIMEOUT:.0f}s") from None
    exited = time.time()
    if proc.returncode != 0:
        raise BenchError(f"docker run failed ({proc.returncode}): {output.decode().strip()}")
    return BareRun(label, spawned, exited)


async def submit(session: aiohttp.ClientSession, marid: Marid) -> BuildRun:
    sent = time.time()
    async with session.post(
        marid.api + "/builds", json={"manifest": MANIFEST}, headers=marid.headers
    ) as resp:
        body = await resp.json(content_type=None)
        if resp.status != 201:
            raise marid.serve.failure(f"POST /builds answered {resp.status} {body}")
    return BuildRun(body["url"], body["id"], sent, created=time.time())


async def follow_job(
    session: aiohttp.ClientSession, marid: Marid, run: BuildRun, first: asyncio.Event
) -> None:
    """Read job s.1's output as Server-Sent Events until its final `status` event, setting
    `first` at the first event (for this job, its output, written as it finishes)."""
    headers = {**marid.headers, "Accept": "text/event-stream"}
    try:
        async with session.get(f"{run.url}/jobs/{JOB}/output", headers=headers) as resp:
            if resp.status != 200:
                raise marid.serve.failure(f"GET {JOB}/output answered {resp.status}")
            event = ""
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                    if not first.is_set():
                        run.first_event = time.time()
                        first.set()
                elif line.startswith("data: ") and event == "status":
                    run.job_done = time.time()
                    return
        raise marid.serve.failure(f"the output stream of {run.url} ended without a status")
    finally:
        first.set()  # never leave one_build waiting on a stream that failed


async def wait_passed(
    session: aiohttp.ClientSession, marid: Marid, run: BuildRun, poll: float
) -> None:
    """GET the build every `poll` seconds until it is final; it must be `passed`."""
    deadline = time.monotonic() + BUILD_TIMEOUT
    while time.monotonic() < deadline:
        async with session.get(run.url, headers=marid.headers) as resp:
            body = await resp.json()
        run.polls += 1
        if body["status"] == "passed":
            run.visible = time.time()
            return
        if body["status"] not in ("queued", "running"):
            raise BenchError(f"{run.url} ended {body['status']}: {body['output']!r}")
        await asyncio.sleep(poll)
    raise BenchError(f"{run.url} not passed after {BUILD_TIMEOUT:.0f}s")


async def one_build(session: aiohttp.ClientSession, marid: Marid, poll: float) -> BuildRun:
    """POST /builds; follow job s.1's event stream; from its first event, GET the build every
    `poll` seconds until it shows `passed`. The stream's `status` event is not waited for
    before polling: it is sometimes a second late (see bench/README.md), which would count
    against marid a delay that GET does not have."""
    run = await submit(session, marid)
    first = asyncio.Event()
    follower = asyncio.create_task(follow_job(session, marid, run, first))
    try:
        await asyncio.wait_for(first.wait(), BUILD_TIMEOUT)
        if follower.done():
            follower.result()  # the stream failed: raise its error
        await wait_passed(session, marid, run, poll)
        await asyncio.wait_for(follower, BUILD_TIMEOUT)  # for job_done, after the timing
    finally:
        follower.cancel()
    return run


async def wait_ready(session: aiohttp.ClientSession, marid: Marid) -> None:
    await wait_serving(session, marid.serve, marid.api, marid.headers, READY_TIMEOUT, marid.runner)


# ---------------------------------------------------------------- the two parts


@dataclass
class Round:
    bare: BareRun
    build: BuildRun
    load: Load
    others_containers: int


@dataclass
class Batch:
    """A throughput batch: `count` operations from `start` until all were done at `end`."""

    kind: str  # "bare" or "build"
    name: str
    count: int
    start: float
    end: float
    load: Load
    others_containers: int
    runs: list[Any] = field(default_factory=list)

    @property
    def per_minute(self) -> float:
        return self.count / (self.end - self.start) * 60


@dataclass
class Bench:
    args: argparse.Namespace
    marid: Marid
    meter: LoadMeter
    events: EngineEvents
    session_label: str
    rounds: list[Round] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)
    db_rows: dict[int, Any] = field(default_factory=dict)  # builds with their jobs' times
    trace: list[tuple[str, str, float, float]] = field(default_factory=list)  # --trace
    counter: int = 0

    def ours(self, event: dict[str, Any]) -> bool:
        attributes = event.get("Actor", {}).get("Attributes", {})
        if attributes.get(BARE_LABEL, "").startswith(self.session_label + "-"):
            return True
        with contextlib.suppress(ValueError):
            return self.marid.build_ids(int(attributes.get("marid.build", "")))
        return False

    def next_label(self) -> str:
        self.counter += 1
        return f"{self.session_label}-{self.counter}"

    async def latency(self, session: aiohttp.ClientSession) -> None:
        poll = self.args.poll_ms / 1000
        for _ in range(self.args.warmup):
            await bare_run(self.next_label())
            await one_build(session, self.marid, poll)
        for number in range(self.args.rounds):
            start = self.meter.snapshot()
            results: dict[str, Any] = {}
            order = ("bare", "build") if number % 2 == 0 else ("build", "bare")
            for kind in order:
                await asyncio.sleep(SETTLE)
                if kind == "bare":
                    results[kind] = await bare_run(self.next_label())
                else:
                    results[kind] = await one_build(session, self.marid, poll)
            load = self.meter.since(start)
            others = self.events.others_started(start[0], start[0] + load.seconds, self.ours)
            result = Round(results["bare"], results["build"], load, others)
            self.rounds.append(result)
            print(
                f"round {number + 1:2}  (a) docker run {result.bare.seconds * 1000:5.0f} ms  "
                f"(b) build {result.build.seconds * 1000:5.0f} ms  "
                f"b - a {(result.build.seconds - result.bare.seconds) * 1000:5.0f} ms  "
                f"{load_text(load, others)}",
                flush=True,
            )
            self.marid.runner.check_alive("during the latency part")

    async def bare_batch(self) -> Batch:
        count, parallelism = self.args.builds, self.args.parallelism
        slots = asyncio.Semaphore(parallelism)

        async def run() -> BareRun:
            async with slots:
                return await bare_run(self.next_label())

        start_load = self.meter.snapshot()
        start = time.time()
        runs = await asyncio.gather(*(run() for _ in range(count)))
        end = time.time()
        name = f"docker run, {parallelism} at a time"
        return self._batch("bare", name, start, end, start_load, runs)

    async def build_batch(self, session: aiohttp.ClientSession) -> Batch:
        count = self.args.builds
        start_load = self.meter.snapshot()
        start = time.time()
        runs = await asyncio.gather(*(submit(session, self.marid) for _ in range(count)))
        deadline = time.monotonic() + BUILD_TIMEOUT + count * 30
        while not await self._all_done(session):
            if time.monotonic() > deadline:
                raise BenchError("the builds did not finish in time")
            self.marid.runner.check_alive("during the throughput part")
            await asyncio.sleep(DONE_POLL)
        end = time.time()
        name = f"marid builds, runner.parallelism {self.args.parallelism}"
        return self._batch("build", name, start, end, start_load, runs)

    async def _all_done(self, session: aiohttp.ClientSession) -> bool:
        """Whether GET /builds lists no queued or running build (one page each suffices)."""
        for status in ("queued", "running"):
            url = f"{self.marid.api}/builds?status={status}"
            async with session.get(url, headers=self.marid.headers) as resp:
                if await resp.json():
                    return False
        return True

    def _batch(
        self,
        kind: str,
        name: str,
        start: float,
        end: float,
        start_load: tuple[float, float, dict[int, ProcStat]],
        runs: list[Any],
    ) -> Batch:
        load = self.meter.since(start_load)
        others = self.events.others_started(start, end, self.ours)
        batch = Batch(kind, name, len(runs), start, end, load, others, runs)
        self.batches.append(batch)
        print(
            f"{name}: {batch.count} in {end - start:6.1f} s = {batch.per_minute:6.1f}/min  "
            f"{load_text(load, others)}",
            flush=True,
        )
        return batch


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> Bench:
    client = check_engine()
    stack.callback(client.close)
    session_label = secrets.token_hex(4)
    first_build_id = 10**9 + secrets.randbelow(10**12)
    directory, cluster = throwaway_cluster(stack, "marid-bench-runner-")
    marid = start_marid(stack, directory, cluster, args, first_build_id)
    # Registered after the processes: runs before them, so they are gone when it does.
    stack.callback(lambda: remove_leftovers(client, session_label, marid.build_ids))
    events = EngineEvents(client)
    stack.callback(events.close)
    meter = LoadMeter(
        postmaster_pid(cluster), lambda: {"serve": marid.serve.pid, "runner": marid.runner.pid}
    )
    bench = Bench(args, marid, meter, events, session_label)
    describe(args, client)
    asyncio.run(measure(bench, directory, cluster))
    return bench


async def measure(bench: Bench, directory: Path, cluster: Cluster) -> None:
    """Both parts, then the database's timestamps (and the runner's trace) for the report."""
    args, marid = bench.args, bench.marid
    timeout = aiohttp.ClientTimeout(total=BUILD_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=10)
    async with aiohttp.ClientSession(trust_env=False, timeout=timeout, connector=connector) as s:
        await wait_ready(s, marid)
        print("\nlatency: runner.parallelism 1", flush=True)
        with profiling(args, marid, "latency"):
            await bench.latency(s)
        if args.pairs:
            print(f"\nthroughput: {args.pairs} x {args.builds} of each (ABBA)", flush=True)
            restart_runner(marid, directory, args.parallelism, args)
            await wait_ready(s, marid)
            with profiling(args, marid, "throughput"):
                for number in range(args.pairs):
                    for kind in ("bare", "build") if number % 2 == 0 else ("build", "bare"):
                        await asyncio.sleep(SETTLE * 4)
                        await (bench.bare_batch() if kind == "bare" else bench.build_batch(s))
    await collect_timestamps(bench, cluster)
    if args.trace:
        lines = trace_file(directory).read_text().splitlines()
        bench.trace = [(k, w, t0, t1) for k, w, t0, t1 in map(json.loads, lines)]


@contextlib.contextmanager
def profiling(args: argparse.Namespace, marid: Marid, part: str) -> Any:
    """With --py-spy: record the runner and the server while the block runs."""
    if not args.py_spy:
        yield
        return
    directory = args.profile_dir or Path.cwd()
    directory.mkdir(parents=True, exist_ok=True)
    recorders = []
    for name, process in (("runner", marid.runner), ("serve", marid.serve)):
        output = directory / f"{name}-{part}.txt"
        argv = [args.py_spy, "record", "--nonblocking", "-r", "200", "-f", "raw", "-o", str(output)]
        argv += ["-d", "1800", "--pid", str(process.pid)]  # ended by SIGINT below
        recorders.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(2)  # SIGINT: py-spy writes its output and exits
        for recorder in recorders:
            try:
                recorder.wait(30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()
        print(f"profiles written to {directory}/*-{part}.txt", flush=True)


# ---------------------------------------------------------------- where the time goes


async def collect_timestamps(bench: Bench, cluster: Cluster) -> None:
    """Attach database timestamps to every build run (as `timestamps` dicts)."""
    build_runs = [r.build for r in bench.rounds] + [
        run for batch in bench.batches for run in batch.runs if isinstance(run, BuildRun)
    ]
    conn = await asyncpg.connect(cluster.dsn(DATABASE))
    try:
        rows = await conn.fetch(
            """
            SELECT b.id, b.status, b.created_at, b.started_at, b.finished_at,
                   cd.started_at AS cd_started, cd.finished_at AS cd_finished,
                   j.started_at AS job_started, j.finished_at AS job_finished
            FROM builds b
            JOIN build_jobs cd ON cd.build_id = b.id AND cd.name = 'create-driver'
            JOIN build_jobs j ON j.build_id = b.id AND j.name = $2
            WHERE b.id = ANY($1::bigint[])
            """,
            [r.build_id for r in build_runs],
            JOB,
        )
    finally:
        await conn.close()
    by_id = {row["id"]: row for row in rows}
    for run in build_runs:
        row = by_id.get(run.build_id)
        if row is None or row["status"] != "passed":
            raise BenchError(f"build {run.build_id} is {row and row['status']}, not passed")
    bench.db_rows = by_id


# ---------------------------------------------------------------- report


def describe(args: argparse.Namespace, client: docker.DockerClient) -> None:
    version = client.version()
    bindir = find_bindir()
    postgres = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    git = ["git", "-C", str(HERE.parent)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    changed = len(status.stdout.splitlines())
    lines = [
        ("when", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        ("marid", f"commit {commit.stdout.strip()}, {changed} changed or new files in the tree"),
        ("machine", f"{os.cpu_count()} CPUs, {cpu_model()}, load average {load}"),
        (
            "software",
            f"Python {platform.python_version()}, Docker Engine {version['Version']} "
            f"(API {version['ApiVersion']}), docker-py {docker.__version__}, "
            f"{postgres.stdout.decode().strip()}",
        ),
        ("(a)", f"docker run --rm --network none --label {BARE_LABEL}=<run> {IMAGE} true"),
        (
            "(b)",
            f"POST /api/builds (one job: true) until GET /api/b/<user>/<n> answers passed; "
            f"GETs every {args.poll_ms} ms from the first event of job {JOB}'s output stream "
            f"(SSE)",
        ),
        (
            "marid",
            f"marid serve + marid runner, drivers [docker], docker.network none, "
            f"logging.level {args.log_level}; PostgreSQL with fsync on",
        ),
        (
            "plan",
            f"{args.warmup} untimed of each; {args.rounds} latency rounds (ABBA) at "
            f"runner.parallelism 1; then {args.pairs} pair(s) of batches (ABBA): "
            f"{args.builds} docker runs {args.parallelism} at a time, {args.builds} builds "
            f"submitted at once at runner.parallelism {args.parallelism}",
        ),
    ]
    for name, text in lines:
        print(f"{name + ':':12} {text}")
    sys.stdout.flush()


def summarise(bench: Bench) -> None:
    bare = [r.bare.seconds * 1000 for r in bench.rounds]
    build = [r.build.seconds * 1000 for r in bench.rounds]
    pairs = [b - a for a, b in zip(bare, build, strict=True)]
    print(f"\nlatency, {len(bench.rounds)} rounds (ms){'median':>14}{'p90':>8}{'min':>8}{'max':>8}")
    for name, values in [("(a) docker run", bare), ("(b) marid build", build)]:
        print(
            f"  {name:32}{statistics.median(values):8.0f}{p90(values):8.0f}"
            f"{min(values):8.0f}{max(values):8.0f}"
        )
    overhead = statistics.median(build) - statistics.median(bare)
    verdict = "meets" if overhead < 150 else "misses"
    print(
        f"overhead b - a: {overhead:.0f} ms (difference of the medians; median of the per-round "
        f"differences {statistics.median(pairs):.0f} ms); {verdict} the 150 ms target"
    )
    quiet = [p for p, r in zip(pairs, bench.rounds, strict=True) if r.load.share("others") < 0.05]
    if quiet:
        print(
            f"  in the {len(quiet)} round(s) where others took under 5% of the machine: "
            f"median b - a {statistics.median(quiet):.0f} ms"
        )
    others = statistics.median(r.load.share("others") for r in bench.rounds)
    print(f"  others' share of the machine, median over the rounds: {others:.0%}")
    if bench.batches:
        throughput(bench.batches)
    breakdown(bench)


def rate(batches: list[Batch]) -> float:
    """Operations per minute over all `batches` together."""
    return sum(b.count for b in batches) / sum(b.end - b.start for b in batches) * 60


def throughput(batches: list[Batch]) -> None:
    bare = [b for b in batches if b.kind == "bare"]
    build = [b for b in batches if b.kind == "build"]
    ratio = rate(build) / rate(bare)
    verdict = "meets" if ratio >= 0.8 else "misses"
    print(
        f"\nthroughput: {rate(build):.1f} builds/min against {rate(bare):.1f} docker runs/min "
        f"({len(build)} batches of {build[0].count} each): ratio {ratio:.2f}; "
        f"{verdict} the 0.8 target"
    )
    pairs = [(batches[i], batches[i + 1]) for i in range(0, len(batches) - 1, 2)]
    for number, pair in enumerate(pairs, 1):
        a, b = sorted(pair, key=lambda batch: batch.kind)  # bare, build
        print(
            f"  pair {number}: {b.per_minute:.1f} / {a.per_minute:.1f} = "
            f"{b.per_minute / a.per_minute:.2f}  (others {a.load.share('others'):.0%} and "
            f"{b.load.share('others'):.0%} of the machine, +{a.others_containers} and "
            f"+{b.others_containers} containers)"
        )
    cpu_per_op(batches)


def cpu_per_op(batches: list[Batch]) -> None:
    """CPU per operation of each class over the batch (see Load for the classes)."""
    print(f"  CPU ms per operation   {'  '.join(f'{c:>8}' for c in CLASSES)}     total")
    for batch in batches:
        cells = [batch.load.cpu[c] / batch.count * 1000 for c in CLASSES]
        label = "docker run" if batch.kind == "bare" else "marid build"
        print(f"  {label:22} {'  '.join(f'{v:8.0f}' for v in cells)}  {sum(cells):8.0f}")
    print(
        "  (others: other sessions' live processes; engine and rest also hold the work of the "
        "containers other sessions started during the batch)"
    )


def breakdown(bench: Bench) -> None:
    times = engine_times(list(bench.events.events))
    rows = bench.db_rows
    latency_points = [
        build_points(
            r.build.moments(), rows[r.build.build_id], times.get(f"build:{r.build.build_id}", {})
        )
        for r in bench.rounds
    ]
    steps_table("where a build's time goes, latency rounds", BUILD_STEPS, latency_points)
    steps_table(
        "the client's view of the end of a build, latency rounds", CLIENT_STEPS, latency_points
    )
    polls = statistics.median(r.build.polls for r in bench.rounds)
    print(f"  GETs of the build per build (median): {polls:.0f}")
    steps_table("not part of the timing: the SSE status event", SSE_STEPS, latency_points)
    late = [p for p in latency_points if p["job_done"] - p["job_finished"] > 0.5]
    print(f"  {len(late)} of {len(latency_points)} status events came over 500 ms late")
    if bench.trace:
        trace_table("runner calls per build, latency rounds (--trace)", bench.trace, latency_points)
    bare_points = [
        {"spawned": r.bare.spawned, "exited": r.bare.exited, **times.get(r.bare.label, {})}
        for r in bench.rounds
    ]
    steps_table("where a docker run's time goes, latency rounds", BARE_STEPS, bare_points)
    if not bench.batches:
        return
    points = []
    for batch in bench.batches:
        if batch.kind == "build":
            found = [
                build_points(
                    run.moments(), rows[run.build_id], times.get(f"build:{run.build_id}", {})
                )
                for run in batch.runs
            ]
            utilisation(batch, found, bench.args.parallelism)
            points += found
    # In a batch, queueing is the point; the runner's part starts at the claim.
    steps_table(
        "where a build's time goes, throughput batches (from the claim)", BUILD_STEPS[2:-1], points
    )
    bare_points = [
        {"spawned": r.spawned, "exited": r.exited, **times.get(r.label, {})}
        for batch in bench.batches
        if batch.kind == "bare"
        for r in batch.runs
    ]
    steps_table("where a docker run's time goes, throughput batches", BARE_STEPS, bare_points)


def utilisation(batch: Batch, points: list[dict[str, float]], parallelism: int) -> None:
    """How busy the runner's slots were: time from claim to finish over slots x batch time."""
    busy = sum(p["finished"] - p["claimed"] for p in points)
    first_claim = min(p["claimed"] for p in points)
    last_finish = max(p["finished"] for p in points)
    print(
        f"\n{batch.name}, batch at {time.strftime('%H:%M:%S', time.localtime(batch.start))}: "
        f"runner slots busy {busy / (parallelism * (last_finish - first_claim)):.0%} of the "
        f"time from the first claim to the last finish; last finish to seen done "
        f"{(batch.end - last_finish) * 1000:.0f} ms; submitting took "
        f"{(max(r.created for r in batch.runs) - batch.start) * 1000:.0f} ms"
    )


def main() -> None:
    args = parse_args()
    if args.py_spy and not Path(args.py_spy).exists():
        sys.exit(f"bench: --py-spy {args.py_spy}: no such file")
    bench = guarded(lambda stack: run(args, stack), DockerException, aiohttp.ClientError)
    summarise(bench)


if __name__ == "__main__":
    main()
