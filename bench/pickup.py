"""Benchmark of queue pickup (issue 14 item 6): enqueue -> claimed, with an idle runner and
with 1,000 builds held back by namespace limits ahead of each probe.

A throwaway PostgreSQL cluster (durable settings; also `track_commit_timestamp` and every
statement's duration in its log) holds one migrated database with one user, allowed the os
driver, and a full-scope token. `marid serve` and one `marid runner` (drivers [os],
parallelism 1) run as separate processes on loopback. Two scenarios, each PROBES timed builds
(after WARMUP untimed ones) of one job `true`, in no namespace, submitted one after another
through POST /api/builds; the next is sent GAP ms after the previous one passed, so the runner
is idle at each submission:

- idle: nothing else in the queue;
- loaded: NAMESPACES namespaces with `max_running: 1`, each with one build running (claimed by
  this script as another runner, leased for a day: the measured runner never gets it) and HELD
  more queued behind it, every one held back by its limit (200 x 5 = 1,000 by default). The
  runner is stopped while they are put in place, then started again.

Per probe, on the database's clock: created (`builds.created_at`, the submitting transaction's
now()), committed (that transaction's commit timestamp, read from the probe's build_tags row)
and claimed (`builds.started_at`, clock_timestamp() inside `claim_build`); on this script's
clock (the same host clock): POST sent and answered. Printed: p50/p90/p99/max of claimed -
created (the target: under 50 ms), claimed - committed and claimed - answered, and where the
time between commit and claim goes, from the PostgreSQL log: the runner's wake-up, its
recover_expired statement and its claim_build statement. Then, with the loaded queue and the
runner stopped, one more probe is submitted and `EXPLAIN ANALYZE SELECT * FROM
claim_build(...)` is run REPEAT times (each rolled back), once with the nested statements'
plans (auto_explain). Everything it started is stopped and removed on exit, Ctrl-C included.

    .venv/bin/python bench/pickup.py [--probes N] [--warmup N] [--gap MS] [--namespaces N]
                                     [--held N] [--repeat N] [--plans] [--nice N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from common import (
    MACHINE_CPUS,
    BenchError,
    Process,
    cpu_model,
    create_database,
    guarded,
    machine_time,
    marid_argv,
    postmaster_pid,
    quantile,
    spread,
    throwaway_cluster,
    wait_serving,
    write_marid_config,
)
from machine import Load, LoadMeter

from marid import db, lifecycle, scopes, tokens, users
from marid.pgcluster import Cluster, free_port

DATABASE = "marid_bench"
USER = "bench"
PROBE_TAG = "probe"
PROBE = 'driver: {type: os}\njobs:\n- commands: ["true"]\n'
HELD = 'namespace: {name}\ndriver: {{type: os}}\njobs:\n- commands: ["true"]\n'
HOLDER = "pickup-holder"  # the runner name this script claims the namespaces' running builds as
HOLDER_LEASE = 86400.0
RUNNER_READY = "runner bench: drivers"  # marid runner's first log line, once it listens
READY_TIMEOUT = 30.0
BUILD_TIMEOUT = 30.0  # seconds a probe may take to pass before the bench fails
DONE_POLL = 0.005  # seconds between looks at a probe's status
SETUP_CONCURRENCY = 8  # requests at once while the loaded queue is built
TARGET_MS = 50.0
# The PostgreSQL log: one record per statement, `<epoch seconds> [<pid>] LOG:  duration: ...`.
RECORD = re.compile(r"^(\d+\.\d+) \[(\d+)\] ", re.MULTILINE)
DURATION = re.compile(r"LOG:  duration: ([\d.]+) ms  (?:execute [^:]*|statement): (.*)", re.DOTALL)
MS = 0.001
INSERT_TEXT = "INSERT INTO builds (user_id"  # marid/submit.py
PENDING_TEXT = "JOIN build_holds($2)"  # marid/builds.py `holds`, a queued build's `pending`
CLAIM_TEXT = "FROM claim_build("
RECOVER_TEXT = "SELECT id, attempt, kill_requested FROM builds"
# The claim as the runner makes it (no author limit), and explained.
CLAIM = "SELECT * FROM claim_build('explain', ARRAY['os'], 60, NULL, ARRAY[]::text[])"
EXPLAIN = f"EXPLAIN (ANALYZE, BUFFERS) {CLAIM}"


@dataclass
class Marid:
    """The two marid processes and how to reach the API."""

    serve: Process
    runner: Process
    config: Path
    directory: Path
    port: int
    dsn: str
    token: str
    restarts: int = 0

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Probe:
    build_id: int
    sent: float  # this script's clock (time.time()), just before POST /builds
    answered: float  # the 201 arrived
    created: float = 0.0  # the database's clock from here on
    committed: float = 0.0
    claimed: float = 0.0
    # From the PostgreSQL log: the submitting transaction's statements before its COMMIT,
    # the COMMIT, and the runner's statements of the round that claimed the probe.
    submission: list[Statement] = field(default_factory=list)
    commit: Statement | None = None
    recover: Statement | None = None
    claim: Statement | None = None


@dataclass(frozen=True)
class Statement:
    """One statement of the PostgreSQL log: it ran from `start` to `end` (epoch seconds)."""

    pid: int
    start: float
    end: float  # when its line was logged, to the millisecond (so start may be up to 1 ms early)
    text: str
    seq: int  # its place in the log: the order of statements within one millisecond

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000


@dataclass
class Scenario:
    name: str
    probes: list[Probe] = field(default_factory=list)
    load: Load | None = None
    busy: float = 0.0  # share of the machine's CPUs busy during the probes, anyone's work
    queued: int = 0  # builds queued (held back) while it ran, probes aside
    # Seconds each process class ran, and waited runnable for a CPU, during the probes.
    ran: dict[str, float] = field(default_factory=dict)
    waited: dict[str, float] = field(default_factory=dict)


@dataclass
class Explained:
    times: list[float]  # ms, EXPLAIN ANALYZE's execution time of each run
    notices: list[str]  # auto_explain's plans of one run, nested statements included
    version: str  # PostgreSQL's


# ---------------------------------------------------------------- set-up


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=200, help="timed probes per scenario (200)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed probes first (5)")
    parser.add_argument(
        "--gap", type=int, default=200, help="ms from a probe passing to the next one (200)"
    )
    parser.add_argument(
        "--namespaces", type=int, default=200, help="namespaces with max_running 1 (200)"
    )
    parser.add_argument(
        "--held", type=int, default=5, help="builds held back in each namespace (5)"
    )
    parser.add_argument(
        "--repeat", type=int, default=20, help="EXPLAIN ANALYZE runs of the loaded claim (20)"
    )
    parser.add_argument(
        "--plans", action="store_true", help="print the nested plans of the loaded claim"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of this script and all it starts (-20 to 19; below 0 needs root): with "
        "a negative one, marid and PostgreSQL get the CPU ahead of other work on the machine",
    )
    args = parser.parse_args()
    for name, low, high in [
        ("probes", 1, 10_000),
        ("warmup", 0, 100),
        ("gap", 0, 10_000),
        ("namespaces", 0, 10_000),
        ("held", 0, 100),
        ("repeat", 1, 1_000),
        ("nice", -20, 19),
    ]:
        if not low <= getattr(args, name) <= high:
            parser.error(f"--{name} must be between {low} and {high}")
    return args


async def prepare(cluster: Cluster) -> str:
    """Create and migrate the database, turn on what the measurement reads (commit timestamps,
    statement durations in the log; the cluster is restarted for the first); returns the
    benchmark user's full-scope token."""
    await create_database(cluster, DATABASE)
    conn = await asyncpg.connect(cluster.dsn(DATABASE))
    try:
        await db.migrate(conn)
        user = await users.create(conn, USER, "bench@example.com", "bench-password")
        _, value = await tokens.create(conn, user, "bench", scopes.FULL)
        for setting, text in [
            ("track_commit_timestamp", "on"),
            ("log_min_duration_statement", "0"),
            ("log_line_prefix", "%n [%p] "),
        ]:
            await conn.execute(f"ALTER SYSTEM SET {setting} = '{text}'")
    finally:
        await conn.close()
    cluster.stop()
    cluster.start(fast=False)
    return value


def runner_process(marid: Marid) -> Process:
    log = marid.directory / f"runner-{marid.restarts}.log"
    return Process("marid runner", marid_argv("runner", marid.config), log)


def start_marid(stack: contextlib.ExitStack, directory: Path, cluster: Cluster) -> Marid:
    token = asyncio.run(prepare(cluster))
    dsn, port = cluster.dsn(DATABASE), free_port()
    config = write_marid_config(
        directory / "marid.yml",
        dsn,
        port,
        drivers=["os"],
        os_driver={"users": [USER]},
        runner={"name": "bench", "parallelism": 1},
        storage={"path": str(directory / "blobs")},
    )
    serve = Process("marid serve", marid_argv("serve", config), directory / "serve.log")
    marid = Marid(serve, serve, config, directory, port, dsn, token)
    marid.runner = runner_process(marid)
    stack.callback(lambda: marid.serve.stop())
    stack.callback(lambda: marid.runner.stop())  # the one running at the time
    serve.start()
    start_runner(marid)
    return marid


def start_runner(marid: Marid) -> None:
    """Start the runner and wait until it listens for builds (its first log line)."""
    marid.runner.start()
    marid.runner.wait_for_line(RUNNER_READY, READY_TIMEOUT)


def restart_runner(marid: Marid) -> None:
    marid.runner.stop()
    marid.restarts += 1
    marid.runner = runner_process(marid)
    start_runner(marid)


async def wait_ready(session: aiohttp.ClientSession, marid: Marid) -> None:
    await wait_serving(session, marid.serve, marid.api, marid.headers, READY_TIMEOUT)


async def post(
    session: aiohttp.ClientSession, marid: Marid, path: str, body: dict[str, Any]
) -> dict[str, Any]:
    async with session.post(marid.api + path, json=body, headers=marid.headers) as resp:
        answer: dict[str, Any] = await resp.json(content_type=None)
        if resp.status != 201:
            raise marid.serve.failure(f"POST {path} answered {resp.status} {answer}")
    return answer


async def load_queue(
    session: aiohttp.ClientSession, conn: asyncpg.Connection, marid: Marid, args: argparse.Namespace
) -> int:
    """With the runner stopped: the namespaces with `max_running: 1`, one running build in
    each (claimed here as HOLDER) and `held` queued builds behind it. Returns how many builds
    are held back, after checking that each one is, for its namespace's limit."""
    slots = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one(path: str, body: dict[str, Any]) -> None:
        async with slots:
            await post(session, marid, path, body)

    names = [f"ns{i}" for i in range(args.namespaces)]
    await asyncio.gather(*(one("/namespaces", {"name": n, "max_running": 1}) for n in names))
    await asyncio.gather(*(one("/builds", {"manifest": HELD.format(name=n)}) for n in names))
    for _ in names:
        async with conn.transaction():
            if await lifecycle.claim(conn, HOLDER, ["os"], HOLDER_LEASE) is None:
                raise BenchError("a namespace's first build could not be claimed")
    bodies = [{"manifest": HELD.format(name=n)} for n in names for _ in range(args.held)]
    await asyncio.gather(*(one("/builds", body) for body in bodies))
    await conn.execute("ANALYZE")
    holds = await conn.fetch("SELECT hold, count(*) FROM build_holds(NULL) GROUP BY hold")
    found = {row["hold"]: row["count"] for row in holds}
    expected = {"namespace": len(bodies)} if bodies else {}
    if found != expected:
        raise BenchError(f"the queue's holds are {found}, not {expected}")
    return len(bodies)


# ---------------------------------------------------------------- probes


async def probe(
    session: aiohttp.ClientSession, conn: asyncpg.Connection, marid: Marid, gap: float
) -> Probe:
    """One probe build: POST /builds, then wait until it passed and `gap` seconds more."""
    sent = time.time()
    body = await post(session, marid, "/builds", {"manifest": PROBE, "tags": [PROBE_TAG]})
    result = Probe(body["id"], sent, time.time())
    deadline = time.monotonic() + BUILD_TIMEOUT
    while True:
        status = await conn.fetchval("SELECT status FROM builds WHERE id = $1", result.build_id)
        if status == "passed":
            break
        if status not in ("queued", "running"):
            raise BenchError(f"probe build {result.build_id} ended {status}")
        if time.monotonic() > deadline:
            raise BenchError(f"probe build {result.build_id} not passed after {BUILD_TIMEOUT}s")
        marid.runner.check_alive("during the probes")
        await asyncio.sleep(DONE_POLL)
    await asyncio.sleep(gap)
    return result


async def run_probes(
    session: aiohttp.ClientSession,
    conn: asyncpg.Connection,
    marid: Marid,
    meter: LoadMeter,
    args: argparse.Namespace,
    scenario: Scenario,
) -> None:
    gap = args.gap / 1000
    for _ in range(args.warmup):
        await probe(session, conn, marid, gap)
    classes = {"serve": [marid.serve.pid], "runner": [marid.runner.pid]}
    classes["PostgreSQL"] = backends(meter.postmaster, conn.get_server_pid())
    start, machine, before = meter.snapshot(), machine_time(), schedstats(classes)
    for number in range(args.probes):
        scenario.probes.append(await probe(session, conn, marid, gap))
        if (number + 1) % 50 == 0:
            print(f"bench: {scenario.name}: {number + 1} probes", file=sys.stderr, flush=True)
    after = schedstats(classes)
    scenario.load = meter.since(start)
    scenario.busy = (machine_time() - machine) / scenario.load.seconds / MACHINE_CPUS
    for name in classes:
        scenario.ran[name] = sum(
            ran - before[name].get(task, (0.0, 0.0))[0] for task, (ran, _) in after[name].items()
        )
        scenario.waited[name] = sum(
            waited - before[name].get(task, (0.0, 0.0))[1]
            for task, (_, waited) in after[name].items()
        )
    rows = await conn.fetch(
        """
        SELECT b.id, extract(epoch FROM b.created_at)::float8 AS created,
               extract(epoch FROM pg_xact_commit_timestamp(t.xmin))::float8 AS committed,
               extract(epoch FROM b.started_at)::float8 AS claimed, b.runner
        FROM builds b JOIN build_tags t ON t.build_id = b.id AND t.name = $2
        WHERE b.id = ANY($1::bigint[])
        """,
        [p.build_id for p in scenario.probes],
        PROBE_TAG,
    )
    by_id = {row["id"]: row for row in rows}
    for p in scenario.probes:
        row = by_id[p.build_id]
        if row["runner"] != "bench":
            raise BenchError(f"probe build {p.build_id} was claimed by {row['runner']}")
        p.created, p.committed, p.claimed = row["created"], row["committed"], row["claimed"]


def backends(postmaster: int, mine: int) -> list[int]:
    """The PostgreSQL processes (postmaster and its children) but this script's backend."""
    found = [postmaster]
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):  # processes come and go
            if entry.name.isdigit() and int(entry.name) != mine:
                ppid = (entry / "stat").read_text().rpartition(")")[2].split()[1]
                if int(ppid) == postmaster:
                    found.append(int(entry.name))
    return found


def schedstats(classes: dict[str, list[int]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per class, per thread (`pid/tid`) of its processes: seconds on a CPU and seconds
    waiting runnable for one, so far (/proc/PID/task/TID/schedstat, in nanoseconds)."""
    found: dict[str, dict[str, tuple[float, float]]] = {}
    for name, pids in classes.items():
        found[name] = {}
        for pid in pids:
            with contextlib.suppress(OSError):  # a process that ended
                for task in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(OSError, ValueError):
                        ran, waited = (task / "schedstat").read_text().split()[:2]
                        found[name][f"{pid}/{task.name}"] = (int(ran) / 1e9, int(waited) / 1e9)
    return found


def read_statements(log: Path) -> list[Statement]:
    """Every statement in the PostgreSQL log with its duration (extended protocol: its
    `execute` step; simple protocol, such as BEGIN and COMMIT: the whole statement)."""
    text = log.read_text(errors="replace")
    starts = list(RECORD.finditer(text))
    found = []
    for here, after in zip(starts, [*starts[1:], None], strict=True):
        match = DURATION.match(text, here.end(), after.start() if after else len(text))
        if match is not None:
            end, ms = float(here.group(1)), float(match.group(1))
            start = end - ms / 1000
            found.append(Statement(int(here.group(2)), start, end, match.group(2), len(found)))
    return found


def attach_statements(scenario: Scenario, statements: list[Statement]) -> None:
    """For each probe: the statements of its submitting transaction and its COMMIT (from the
    backend that inserted the build), the claim_build call that claimed it (the one running at
    its started_at) and the recover_expired statement of the same round (the last before)."""
    by_pid: dict[int, list[Statement]] = {}
    for statement in statements:
        by_pid.setdefault(statement.pid, []).append(statement)
    inserts = [s for s in statements if INSERT_TEXT in s.text]
    claims = [s for s in statements if CLAIM_TEXT in s.text]
    recovers = [s for s in statements if RECOVER_TEXT in s.text]
    for p in scenario.probes:
        # The log's timestamps are whole milliseconds: allow one either side.
        insert = next((s for s in inserts if p.created - MS <= s.start <= p.committed), None)
        if insert is not None:
            own = by_pid[insert.pid]
            p.commit = min(
                (s for s in own if s.text.startswith("COMMIT") and s.start >= insert.end - MS),
                key=lambda s: s.start,
                default=None,
            )
            if p.commit is not None:
                p.submission = [
                    s for s in own if p.created - MS <= s.start and s.end <= p.commit.start + MS
                ]
        p.claim = next((s for s in claims if s.start - MS <= p.claimed <= s.end + MS), None)
        if p.claim is not None:
            before = [s for s in recovers if p.committed - MS <= s.start and s.seq < p.claim.seq]
            p.recover = before[-1] if before else None


# ---------------------------------------------------------------- the loaded claim, explained


async def rolled_back(conn: asyncpg.Connection, statements: list[str]) -> list[asyncpg.Record]:
    """Run `statements` in one transaction, rolled back; the rows of the last."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        rows: list[asyncpg.Record] = []
        for statement in statements:
            rows = await conn.fetch(statement)
        return rows
    finally:
        await transaction.rollback()


async def explain_claim(
    session: aiohttp.ClientSession, conn: asyncpg.Connection, marid: Marid, args: argparse.Namespace
) -> Explained:
    """With the runner stopped and the loaded queue in place, one more probe queued: the
    execution times of `args.repeat` EXPLAIN ANALYZE runs of the claim (each rolled back), and
    the plans of its nested statements (auto_explain) from one more run."""
    await post(session, marid, "/builds", {"manifest": PROBE, "tags": [PROBE_TAG]})
    times = []
    for _ in range(args.repeat):
        plan = "\n".join(row[0] for row in await rolled_back(conn, [EXPLAIN]))
        times.append(float(re.findall(r"Execution Time: ([\d.]+) ms", plan)[-1]))
    notices: list[str] = []
    conn.add_log_listener(lambda _conn, message: notices.append(str(message.message)))
    await rolled_back(
        conn,
        [
            "LOAD 'auto_explain'",
            "SET LOCAL auto_explain.log_min_duration = 0",
            "SET LOCAL auto_explain.log_analyze = on",
            "SET LOCAL auto_explain.log_buffers = on",
            "SET LOCAL auto_explain.log_nested_statements = on",
            "SET LOCAL auto_explain.log_level = notice",
            CLAIM,
        ],
    )
    await asyncio.sleep(0.1)  # the notices came with the answer; let their callbacks run
    return Explained(times, notices, await conn.fetchval("SHOW server_version"))


# ---------------------------------------------------------------- the run


async def measure(
    marid: Marid, meter: LoadMeter, args: argparse.Namespace
) -> tuple[list[Scenario], Explained]:
    idle, loaded = Scenario("idle"), Scenario("loaded")
    conn = await asyncpg.connect(marid.dsn)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, marid)
            await run_probes(session, conn, marid, meter, args, idle)
            marid.runner.stop()  # else it would claim the namespaces' builds
            print("bench: building the loaded queue ...", file=sys.stderr, flush=True)
            loaded.queued = await load_queue(session, conn, marid, args)
            restart_runner(marid)
            await run_probes(session, conn, marid, meter, args, loaded)
            marid.runner.stop()
            explained = await explain_claim(session, conn, marid, args)
            held, taken = await conn.fetchrow(
                """
                SELECT count(*) FILTER (WHERE status = 'running' AND runner = $1),
                       count(*) FILTER (WHERE runner = 'bench')
                FROM builds WHERE namespace_id IS NOT NULL
                """,
                HOLDER,
            )
            if held != args.namespaces or taken:
                raise BenchError(
                    f"{held} namespace builds running as {HOLDER}, not {args.namespaces}, and "
                    f"{taken} claimed by the measured runner, not 0"
                )
    finally:
        await conn.close()
    return [idle, loaded], explained


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[list[Scenario], Explained]:
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by everything started below
    directory, cluster = throwaway_cluster(stack, "marid-bench-pickup-")
    marid = start_marid(stack, directory, cluster)
    meter = LoadMeter(
        postmaster_pid(cluster), lambda: {"serve": marid.serve.pid, "runner": marid.runner.pid}
    )
    scenarios, explained = asyncio.run(measure(marid, meter, args))
    statements = read_statements(cluster.directory / "postgres.log")
    for scenario in scenarios:
        attach_statements(scenario, statements)
    return scenarios, explained


# ---------------------------------------------------------------- report


# Where the time from created to claimed goes, in order (the indented ones are parts of the
# step above them, not further steps).
STEPS = (
    "created -> committed",
    "  submission's statements",
    "    the pending look-up",
    "  marid serve between them",
    "committed -> COMMIT answered",
    "COMMIT answered -> runner round",
    "recover_expired statement",
    "recover end -> claim start",
    "claim start -> claimed",
    "  claim_build statement",
)


def steps(p: Probe) -> dict[str, float]:
    """The probe's STEPS, in ms; it must have its statements from the log."""
    assert p.commit is not None and p.recover is not None and p.claim is not None
    statements = sum(s.ms for s in p.submission)
    return {
        "created -> committed": (p.committed - p.created) * 1000,
        "  submission's statements": statements,
        "    the pending look-up": sum(s.ms for s in p.submission if PENDING_TEXT in s.text),
        "  marid serve between them": (p.commit.start - p.created) * 1000 - statements,
        "committed -> COMMIT answered": (p.commit.end - p.committed) * 1000,
        "COMMIT answered -> runner round": (p.recover.start - p.commit.end) * 1000,
        "recover_expired statement": p.recover.ms,
        "recover end -> claim start": (p.claim.start - p.recover.end) * 1000,
        "claim start -> claimed": (p.claimed - p.claim.start) * 1000,
        "  claim_build statement": p.claim.ms,
    }


def report(scenarios: list[Scenario], explained: Explained, args: argparse.Namespace) -> None:
    print(
        f"{args.probes} probes per scenario after {args.warmup} untimed, {args.gap} ms apart "
        f"after each passed, niceness {args.nice}; {MACHINE_CPUS} CPUs ({cpu_model()}), "
        f"Python {platform.python_version()}, PostgreSQL {explained.version}"
    )
    for s in scenarios:
        assert s.load is not None
        probes = s.probes
        target = [(p.claimed - p.created) * 1000 for p in probes]
        p99 = quantile(target, 0.99)
        verdict = "meets" if p99 < TARGET_MS else "MISSES"
        marid = s.load.share("serve") + s.load.share("runner")
        print(
            f"\n{s.name}: {s.queued} builds held back in the queue; machine busy {s.busy:.0%} "
            f"during the probes (marid {marid:.0%}, its PostgreSQL {s.load.share('postgres'):.0%},"
            f" the rest other work)"
        )
        rows = [
            ("created -> claimed (target)", target),
            ("committed -> claimed", [(p.claimed - p.committed) * 1000 for p in probes]),
            ("POST answered -> claimed", [(p.claimed - p.answered) * 1000 for p in probes]),
            ("POST sent -> claimed", [(p.claimed - p.sent) * 1000 for p in probes]),
        ]
        traced = [steps(p) for p in probes if p.commit and p.recover and p.claim]
        rows += [(f"  {name}", [t[name] for t in traced]) for name in STEPS]
        for label, values in rows:
            print(f"  {label:33} ms  {spread(values)}")
        cpu = ", ".join(
            f"{name} {s.ran[name] / len(probes) * 1000:.1f} ms on a CPU and "
            f"{s.waited[name] / len(probes) * 1000:.1f} ms waiting for one"
            for name in s.ran
        )
        print(f"  per probe, its whole cycle (submit, claim, run, finish): {cpu}")
        missing = {
            "COMMIT": sum(p.commit is None for p in probes),
            "claim": sum(p.claim is None for p in probes),
            "round": sum(p.claim is not None and p.recover is None for p in probes),
        }
        print(
            f"  p99 created -> claimed {p99:.2f} ms: {verdict} the {TARGET_MS:.0f} ms target"
            f"  (steps from the PostgreSQL log for {len(traced)} of {len(probes)} probes; not"
            f" found: " + ", ".join(f"{name} {count}" for name, count in missing.items()) + ")"
        )
    times, notices = explained.times, explained.notices
    print(
        f"\nEXPLAIN ANALYZE of the claim with {scenarios[-1].queued} builds held back and one "
        f"probe queued ({len(times)} runs, rolled back): execution ms  {spread(times)}"
    )
    if args.plans:
        for notice in notices:
            print(notice)


def main() -> None:
    args = parse_args()
    scenarios, explained = guarded(lambda stack: run(args, stack), aiohttp.ClientError)
    report(scenarios, explained, args)


if __name__ == "__main__":
    main()
