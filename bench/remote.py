"""Benchmark of a runner on another machine (issue 15): submit -> passed through a remote
runner (`marid runner --server`, the API's runner protocol) against an in-process runner
(`marid runner` with the database's DSN), side by side, and the claim latency through the long
poll.

A throwaway PostgreSQL cluster (durable settings, and `track_commit_timestamp`) holds one
migrated database with one user, allowed the os driver, a full-scope token and an enrolment
token. `marid serve` runs as a process on loopback throughout. Two scenarios, each one runner
process with `drivers: [os]` and parallelism 1, never both at once:

- in-process: `marid runner --config FILE` with the database's DSN in FILE;
- remote: `marid runner --server http://127.0.0.1:PORT/api --token-file F --config FILE`, FILE
  with no server, database, crypto or storage section; it registers with the enrolment token
  at each start.

The scenarios take turns in ROUNDS rounds, ABBA (in-process first in even rounds, remote first
in odd ones), so that a noisy machine weighs on both alike. In each turn the scenario's runner
is started, runs WARMUP untimed probes, then its share of the timed ones, and is stopped. Two
variants of probe (three with --sleep), alternating within a turn: `one`, one job `true`;
`three`, three jobs, each `seq 1 2000` (8.9 kB of output); `sleep`, with --sleep MS, one job
`sleep` of MS ms; each build also runs its setup job, `create-driver`. A probe is POST
/api/builds (tag `probe`); the script then reads its status every 5 ms until it is `passed`,
and sends the next one GAP ms later: the runner is idle at each submission, an in-process one
waiting on LISTEN, a remote one with its claim parked at the API (the claim is sent again as
soon as the previous build ends, and answered once a NOTIFY wakes it).

Per probe, on the database's clock: created (`builds.created_at`, the submitting transaction's
now()), committed (its commit timestamp, from the probe's build_tags row), claimed
(`builds.started_at`, clock_timestamp() in `claim_build`), the first job started and the last
finished (`build_jobs`), finished (`builds.finished_at`); on this script's clock (the same host
clock): POST sent and `passed` seen. Printed per variant: p50/p90/p99/max of created ->
finished (the target: the remote median at most 1.1 times the in-process one) and of sent ->
seen, and of the steps in between; the claim latency (created -> claimed, committed ->
claimed) of all probes; the CPU per probe of marid serve, the runner and PostgreSQL, and, from
marid serve's access log, the runner protocol's requests per remote probe and their time in
the server. Everything it started is stopped and removed on exit, Ctrl-C included.

    .venv/bin/python bench/remote.py [--probes N] [--rounds N] [--warmup N] [--gap MS]
                                     [--sleep MS] [--nice N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import yaml
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
    spread,
    throwaway_cluster,
    wait_serving,
    write_marid_config,
)
from machine import CLASSES, Load, LoadMeter

from marid import db, remote, scopes, tokens, users
from marid.pgcluster import Cluster, free_port

DATABASE = "marid_bench"
USER = "bench"
PROBE_TAG = "probe"
VARIANTS = {
    # A job needs a stage: one without is dropped (docs/manifest.md §2.8).
    "one": 'driver: {type: os}\nstages: [s]\njobs:\n- {stage: s, commands: ["true"]}\n',
    "three": "driver: {type: os}\nstages: [s]\njobs:\n"
    + '- {stage: s, commands: ["seq 1 2000"]}\n' * 3,
}
DESCRIBED = {"one": "one job `true`", "three": "three jobs `seq 1 2000` (8.9 kB output each)"}
SCENARIOS = ("in-process", "remote")
NAMES = {"in-process": "bench-local", "remote": "bench-remote"}  # runner.name of each
READY = {  # the runner's log line once it can claim
    "in-process": "runner bench-local: drivers",
    "remote": "runner bench-remote: registered with",
}
READY_TIMEOUT = 30.0
BUILD_TIMEOUT = 30.0  # seconds a probe may take to pass before the bench fails
DONE_POLL = 0.005  # seconds between looks at a probe's status
TARGET = 1.1  # remote median / in-process median of created -> finished, at most
# marid serve's access log (marid/api/errors.py): `... marid.access: POST /api/x 204 3.2ms`.
ACCESS = re.compile(r"marid\.access: (\w+) (/api/runner/\S+) (\d{3}) ([\d.]+)ms$", re.MULTILINE)
NUMBER = re.compile(r"/\d+")
STATEMENTS = """
    SELECT queryid, query, calls, total_exec_time FROM pg_stat_statements WHERE toplevel
"""
OWN_QUERIES = ("pg_stat_", "SELECT status FROM builds WHERE id = $1")  # this script's
TEXTS: dict[int, str] = {}  # a text of each statement seen, by its query id
SHOWN_STATEMENTS = 15  # of those the remote makes more often than the in-process runner


@dataclass
class Marid:
    """marid serve, the runner of the turn, and how to reach the API."""

    serve: Process
    runner: Process | None
    directory: Path
    configs: dict[str, Path]  # scenario -> the runner's configuration file
    token_file: Path
    port: int
    dsn: str
    token: str
    starts: int = 0

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Probe:
    variant: str
    build_id: int
    sent: float  # this script's clock (time.time()), just before POST /builds
    seen: float = 0.0  # `passed` read
    created: float = 0.0  # the database's clock from here on
    committed: float = 0.0
    claimed: float = 0.0
    job_started: float = 0.0  # the first job's
    job_finished: float = 0.0  # the last job's
    finished: float = 0.0


@dataclass
class Scenario:
    name: str
    probes: list[Probe] = field(default_factory=list)
    seconds: float = 0.0  # wall time of its timed probes, all turns
    machine: float = 0.0  # CPU seconds of the whole machine meanwhile
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0.0))
    # Runner-protocol requests during its timed probes: route -> server-side ms of each.
    requests: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # PostgreSQL's top-level statements during its timed probes (but this script's): query id
    # -> [calls, ms executing]; and the WAL flushes (fsyncs) meanwhile.
    statements: dict[int, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    wal_syncs: int = 0

    def add(self, load: Load, machine: float) -> None:
        self.seconds += load.seconds
        self.machine += machine
        for name, value in load.cpu.items():
            self.cpu[name] += value

    def share(self, name: str) -> float:
        return self.cpu[name] / (self.seconds * MACHINE_CPUS) if self.seconds else 0.0


# ---------------------------------------------------------------- set-up


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--probes", type=int, default=100, help="timed probes per scenario and variant (100)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="turns of each scenario (5)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed probes per turn (4)")
    parser.add_argument(
        "--gap", type=int, default=200, help="ms from a probe passing to the next one (200)"
    )
    parser.add_argument(
        "--sleep",
        type=int,
        default=0,
        help="also a third variant, one job `sleep` of this many ms (0: none)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of this script and all it starts (-20 to 19; below 0 needs root)",
    )
    args = parser.parse_args()
    for name, low, high in [
        ("probes", 1, 10_000),
        ("rounds", 1, 100),
        ("warmup", 0, 100),
        ("gap", 0, 10_000),
        ("sleep", 0, 10_000),
        ("nice", -20, 19),
    ]:
        if not low <= getattr(args, name) <= high:
            parser.error(f"--{name} must be between {low} and {high}")
    if args.probes < args.rounds:
        parser.error("--probes must be at least --rounds")
    if args.sleep:
        command = f"sleep {args.sleep / 1000:g}"
        VARIANTS["sleep"] = VARIANTS["one"].replace('"true"', f'"{command}"')
        DESCRIBED["sleep"] = f"one job `{command}`"
    return args


async def prepare(cluster: Cluster) -> tuple[str, str]:
    """Create and migrate the database, turn on commit timestamps and pg_stat_statements (the
    cluster is restarted); returns the benchmark user's full-scope token and an enrolment token."""
    await create_database(cluster, DATABASE)
    conn = await asyncpg.connect(cluster.dsn(DATABASE))
    try:
        await db.migrate(conn)
        user = await users.create(conn, USER, "bench@example.com", "bench-password")
        _, value = await tokens.create(conn, user, "bench", scopes.FULL)
        _, enrolment = await remote.create_enrolment(conn, "bench", None, None)
        await conn.execute("ALTER SYSTEM SET track_commit_timestamp = 'on'")
        await conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    finally:
        await conn.close()
    cluster.stop()
    cluster.start(fast=False)
    return value, enrolment


def start_marid(stack: contextlib.ExitStack, directory: Path, cluster: Cluster) -> Marid:
    token, enrolment = asyncio.run(prepare(cluster))
    dsn, port = cluster.dsn(DATABASE), free_port()
    sections: dict[str, Any] = {
        "drivers": ["os"],
        "os_driver": {"users": [USER]},
        "logging": {"level": "info"},  # the access log: the runner protocol's requests
    }
    config = write_marid_config(
        directory / "marid.yml",
        dsn,
        port,
        runner={"name": NAMES["in-process"], "parallelism": 1},
        storage={"path": str(directory / "blobs")},
        **sections,
    )
    # The remote runner's: no server, database, crypto or storage section (docs/runners.md).
    remote_config = directory / "remote.yml"
    remote_config.write_text(
        yaml.safe_dump({**sections, "runner": {"name": NAMES["remote"], "parallelism": 1}})
    )
    token_file = directory / "enrolment"
    token_file.write_text(enrolment + "\n")
    token_file.chmod(0o600)
    serve = Process("marid serve", marid_argv("serve", config), directory / "serve.log")
    configs = {"in-process": config, "remote": remote_config}
    marid = Marid(serve, None, directory, configs, token_file, port, dsn, token)
    stack.callback(lambda: marid.serve.stop())
    stack.callback(lambda: marid.runner.stop() if marid.runner else None)
    serve.start()
    return marid


def start_runner(marid: Marid, scenario: str) -> Process:
    """Start the scenario's runner and wait until it can claim (an in-process one's first
    line; a remote one's registration)."""
    argv = marid_argv("runner", marid.configs[scenario])
    if scenario == "remote":
        argv += ["--server", marid.api, "--token-file", str(marid.token_file)]
    marid.starts += 1
    log = marid.directory / f"runner-{marid.starts:02d}-{scenario}.log"
    marid.runner = Process(f"marid runner ({scenario})", argv, log)
    marid.runner.start()
    marid.runner.wait_for_line(READY[scenario], READY_TIMEOUT)
    return marid.runner


async def wait_ready(session: aiohttp.ClientSession, marid: Marid) -> None:
    await wait_serving(session, marid.serve, marid.api, marid.headers, READY_TIMEOUT)


# ---------------------------------------------------------------- probes


async def probe(
    session: aiohttp.ClientSession,
    conn: asyncpg.Connection,
    marid: Marid,
    variant: str,
    gap: float,
) -> Probe:
    """One probe build: POST /builds, then wait until it passed and `gap` seconds more."""
    sent = time.time()
    body = {"manifest": VARIANTS[variant], "tags": [PROBE_TAG]}
    async with session.post(marid.api + "/builds", json=body, headers=marid.headers) as resp:
        answer: dict[str, Any] = await resp.json(content_type=None)
        if resp.status != 201:
            raise marid.serve.failure(f"POST /builds answered {resp.status} {answer}")
    result = Probe(variant, answer["id"], sent)
    deadline = time.monotonic() + BUILD_TIMEOUT
    assert marid.runner is not None
    while True:
        status = await conn.fetchval("SELECT status FROM builds WHERE id = $1", result.build_id)
        if status == "passed":
            result.seen = time.time()
            break
        if status not in ("queued", "running"):
            raise BenchError(f"probe build {result.build_id} ended {status}")
        if time.monotonic() > deadline:
            raise marid.runner.failure(
                f"probe build {result.build_id} not passed after {BUILD_TIMEOUT:.0f}s"
            )
        marid.runner.check_alive("during the probes")
        await asyncio.sleep(DONE_POLL)
    await asyncio.sleep(gap)
    return result


def access_records(log: Path, start: int) -> tuple[list[tuple[str, float]], int]:
    """The runner-protocol requests marid serve logged from byte `start` of its log: (route,
    server-side ms), ids in paths replaced by `{id}`; and where the log ends now."""
    data = log.read_bytes()
    found = [
        (f"{m.group(1)} {NUMBER.sub('/{id}', m.group(2))} {m.group(3)}", float(m.group(4)))
        for m in ACCESS.finditer(data[start:].decode(errors="replace"))
    ]
    return found, len(data)


async def turn(
    session: aiohttp.ClientSession,
    conn: asyncpg.Connection,
    marid: Marid,
    meter: LoadMeter,
    args: argparse.Namespace,
    scenario: Scenario,
    count: int,
    first: int,
) -> None:
    """One turn of the scenario: its runner started, WARMUP untimed probes, `count` timed ones
    (variants alternating, starting with variant number `first`), the runner stopped."""
    gap = args.gap / 1000
    names = list(VARIANTS)
    runner = start_runner(marid, scenario.name)
    try:
        for number in range(args.warmup):
            await probe(session, conn, marid, names[number % len(names)], gap)
        await conn.execute("SELECT pg_stat_statements_reset()")
        syncs = await conn.fetchval("SELECT wal_sync FROM pg_stat_wal")
        start, machine = meter.snapshot(), machine_time()
        _, offset = access_records(marid.serve.log, 0)
        for number in range(count):
            variant = names[(first + number) % len(names)]
            scenario.probes.append(await probe(session, conn, marid, variant, gap))
        scenario.add(meter.since(start), machine_time() - machine)
        records, _ = access_records(marid.serve.log, offset)
        for route, ms in records:
            scenario.requests[route].append(ms)
        scenario.wal_syncs += await conn.fetchval("SELECT wal_sync FROM pg_stat_wal") - syncs
        for row in await conn.fetch(STATEMENTS):
            text = " ".join(row["query"].split())
            if not any(mine in text for mine in OWN_QUERIES):
                # The id, not the text: a statement's text is that of its first run since the
                # reset, with or without its constants replaced by parameters.
                TEXTS.setdefault(row["queryid"], text)
                scenario.statements[row["queryid"]][0] += row["calls"]
                scenario.statements[row["queryid"]][1] += row["total_exec_time"]
    finally:
        runner.stop()


async def read_times(conn: asyncpg.Connection, scenario: Scenario) -> None:
    rows = await conn.fetch(
        """
        SELECT b.id, b.runner,
               extract(epoch FROM b.created_at)::float8 AS created,
               extract(epoch FROM pg_xact_commit_timestamp(t.xmin))::float8 AS committed,
               extract(epoch FROM b.started_at)::float8 AS claimed,
               extract(epoch FROM b.finished_at)::float8 AS finished,
               (SELECT extract(epoch FROM min(j.started_at))::float8 FROM build_jobs j
                WHERE j.build_id = b.id) AS job_started,
               (SELECT extract(epoch FROM max(j.finished_at))::float8 FROM build_jobs j
                WHERE j.build_id = b.id) AS job_finished
        FROM builds b JOIN build_tags t ON t.build_id = b.id AND t.name = $2
        WHERE b.id = ANY($1::bigint[])
        """,
        [p.build_id for p in scenario.probes],
        PROBE_TAG,
    )
    by_id = {row["id"]: row for row in rows}
    for p in scenario.probes:
        row = by_id[p.build_id]
        if row["runner"] != NAMES[scenario.name]:
            raise BenchError(f"probe build {p.build_id} was claimed by {row['runner']}")
        p.created, p.committed, p.claimed = row["created"], row["committed"], row["claimed"]
        p.job_started, p.job_finished = row["job_started"], row["job_finished"]
        p.finished = row["finished"]


async def measure(marid: Marid, meter: LoadMeter, args: argparse.Namespace) -> list[Scenario]:
    scenarios = {name: Scenario(name) for name in SCENARIOS}
    per_turn = len(VARIANTS) * args.probes
    shares = [per_turn // args.rounds + (r < per_turn % args.rounds) for r in range(args.rounds)]
    conn = await asyncpg.connect(marid.dsn)
    try:
        await conn.execute("CREATE EXTENSION pg_stat_statements")
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, marid)
            done = 0
            for number, count in enumerate(shares):
                order = SCENARIOS if number % 2 == 0 else SCENARIOS[::-1]
                for name in order:
                    await turn(session, conn, marid, meter, args, scenarios[name], count, done)
                done += count
                print(
                    f"bench: round {number + 1} of {args.rounds} done ({done} probes each)",
                    file=sys.stderr,
                    flush=True,
                )
            for scenario in scenarios.values():
                await read_times(conn, scenario)
            version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    args.version = version
    return list(scenarios.values())


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[Scenario]:
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by everything started below
    args.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.loadavg = Path("/proc/loadavg").read_text().split()[:3]
    directory, cluster = throwaway_cluster(stack, "marid-bench-remote-")
    marid = start_marid(stack, directory, cluster)
    meter = LoadMeter(
        postmaster_pid(cluster),
        lambda: {"serve": marid.serve.pid, "runner": marid.runner.pid if marid.runner else 0},
    )
    return asyncio.run(measure(marid, meter, args))


# ---------------------------------------------------------------- report


# What is printed of each probe, in ms; the indented rows are the steps of the first two.
ROWS = {
    "created -> finished (target)": lambda p: p.finished - p.created,
    "POST sent -> passed seen": lambda p: p.seen - p.sent,
    "  created -> committed": lambda p: p.committed - p.created,
    "  committed -> claimed": lambda p: p.claimed - p.committed,
    "  claimed -> first job started": lambda p: p.job_started - p.claimed,
    "  first job started -> last ended": lambda p: p.job_finished - p.job_started,
    "  last job ended -> finished": lambda p: p.finished - p.job_finished,
    "  finished -> passed seen": lambda p: p.seen - p.finished,
}


def ms(values: list[Probe], row: str) -> list[float]:
    return [ROWS[row](p) * 1000 for p in values]


def report(scenarios: list[Scenario], args: argparse.Namespace) -> None:
    by_name = {s.name: s for s in scenarios}
    print(
        f"{args.probes} probes per scenario and variant in {args.rounds} rounds (ABBA), "
        f"{args.warmup} untimed per turn, {args.gap} ms apart after each passed, niceness "
        f"{args.nice}; started {args.started}, load average {' '.join(args.loadavg)}; "
        f"{MACHINE_CPUS} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"PostgreSQL {args.version}"
    )
    for s in scenarios:
        busy = s.machine / s.seconds / MACHINE_CPUS if s.seconds else 0.0
        print(
            f"{s.name:>10}: machine busy {busy:.0%} during its probes (serve "
            f"{s.share('serve'):.0%}, runner {s.share('runner'):.0%}, its PostgreSQL "
            f"{s.share('postgres'):.0%}, this script {s.share('bench'):.0%}, the rest other work)"
        )
    verdicts = []
    for variant in VARIANTS:
        print(f"\n{variant}: {DESCRIBED[variant]}")
        probes = {s.name: [p for p in s.probes if p.variant == variant] for s in scenarios}
        for row in ROWS:
            for name in SCENARIOS:
                label = row if name == SCENARIOS[0] else ""
                print(f"  {label:34} {name:>10} ms  {spread(ms(probes[name], row))}")
        for row in list(ROWS)[:2]:
            local, other = (statistics.median(ms(probes[n], row)) for n in SCENARIOS)
            ratio = other / local
            verdicts.append(ratio)
            verdict = "meets" if ratio <= TARGET else "MISSES"
            print(
                f"  remote / in-process, medians of {row.removesuffix(' (target)')}: "
                f"{ratio:.2f}" + (f" ({verdict} the {TARGET}x target)" if "target" in row else "")
            )
    print("\nclaim latency, the runner idle (LISTEN, or the remote's claim parked), all probes:")
    for row in ("created -> claimed", "committed -> claimed"):
        for name in SCENARIOS:
            start = "created" if row.startswith("created") else "committed"
            values = [(p.claimed - getattr(p, start)) * 1000 for p in by_name[name].probes]
            label = row if name == SCENARIOS[0] else ""
            print(f"  {label:34} {name:>10} ms  {spread(values)}")
    print("\nCPU per probe (submit, claim, run, finish; ms):")
    for s in scenarios:
        count = len(s.probes)
        cpu = ", ".join(
            f"{name} {s.cpu[name] / count * 1000:.1f}" for name in ("serve", "runner", "postgres")
        )
        print(f"  {s.name:>10}: {cpu}")
    far = by_name["remote"]
    count = len(far.probes)
    total = sum(len(v) for v in far.requests.values())
    print(
        f"\nremote: runner-protocol requests in marid serve's access log, {total / count:.1f} per"
        f" probe ({count} probes); route, requests per probe, server-side ms p50 / sum per probe"
        " (a claim's time includes its wait, parked, for the next build):"
    )
    for route, times in sorted(far.requests.items(), key=lambda item: -sum(item[1])):
        print(
            f"  {route:50} {len(times) / count:5.2f}  {statistics.median(times):7.2f} "
            f"{sum(times) / count:8.2f}"
        )


def report_statements(scenarios: list[Scenario]) -> None:
    counts = {s.name: len(s.probes) for s in scenarios}
    print("\nPostgreSQL per probe (its top-level statements, this script's polls aside):")
    for s in scenarios:
        calls = sum(c for c, _ in s.statements.values()) / counts[s.name]
        spent = sum(t for _, t in s.statements.values()) / counts[s.name]
        commits = sum(c for q, (c, _) in s.statements.items() if TEXTS[q] == "COMMIT")
        commits /= counts[s.name]
        print(
            f"  {s.name:>10}: {calls:5.1f} statements, {spent:5.2f} ms executing them, "
            f"{commits:4.1f} COMMITs, {s.wal_syncs / counts[s.name]:4.1f} WAL flushes"
        )
    local, other = scenarios
    extra = []
    for query in set(local.statements) | set(other.statements):
        mine = other.statements.get(query, [0, 0.0])
        theirs = local.statements.get(query, [0, 0.0])
        more = mine[0] / counts[other.name] - theirs[0] / counts[local.name]
        if more > 0.05:
            extra.append((more, mine, theirs, query))
    extra.sort(key=lambda item: -item[0])
    print(
        f"  statements the {other.name} runner's probes make more often, per probe "
        f"({other.name} / {local.name}, calls and ms executing):"
    )
    for _more, mine, theirs, query in extra[:SHOWN_STATEMENTS]:
        print(
            f"    {mine[0] / counts[other.name]:5.2f} {mine[1] / counts[other.name]:6.2f}  "
            f"{theirs[0] / counts[local.name]:5.2f} {theirs[1] / counts[local.name]:6.2f}  "
            f"{TEXTS[query][:100]}"
        )


def main() -> None:
    args = parse_args()
    scenarios = guarded(lambda stack: run(args, stack), aiohttp.ClientError)
    report(scenarios, args)
    report_statements(scenarios)


if __name__ == "__main__":
    main()
