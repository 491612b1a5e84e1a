"""Benchmark of the cron scheduler (issue 5): 100,000 cron jobs, 10,000 of them due.

A throwaway PostgreSQL cluster (durable settings) holds one migrated database with USERS users
and CRONS cron jobs (a one-job docker manifest each), none due yet. SCHEDULERS `marid scheduler`
processes start against it (cron.interval 1s, the default batch). Two parts:

- burst: DUE cron jobs are made due at one instant T0 (a few seconds ahead); the time from T0
  until all DUE builds exist, and each build's delay after T0;
- stream: STREAM other cron jobs are made due one after another, SPACING ms apart; each
  build's delay after its own next_run (the firing delay of a scheduler that is keeping up).

A build "exists" when this script sees it committed: it polls the builds table every POLL
seconds, so delays are over-estimated by up to POLL. For each part it also reports the CPU time
of the schedulers, of PostgreSQL (postmaster and backends) and of everything else on the machine.
Then it checks exactly-once (one build and one cron_runs row per fired cron job), prints the
figures, and removes everything it started.

    .venv/bin/python bench/scheduler.py [--crons N] [--due N] [--schedulers N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from common import (
    MACHINE_CPUS,
    Process,
    cpu_model,
    cpu_time,
    create_database,
    family_time,
    free_port,
    guarded,
    machine_time,
    marid_argv,
    postmaster_pid,
    self_time,
    throwaway_cluster,
    write_marid_config,
)

from marid import db

MANIFEST = "driver: {type: docker, image: busybox, workspace: /w}\njobs:\n- commands: [true]\n"
FAR = datetime(2100, 1, 1, tzinfo=UTC)
POLL = 0.01
LEAD = 3.0  # seconds between making cron jobs due and their next_run


@dataclass
class Cpu:
    """CPU seconds so far (wall clock for `wall`), from /proc."""

    wall: float
    schedulers: float
    postgres: float
    bench: float
    machine: float  # every process on the machine, and time the hypervisor stole

    @classmethod
    def now(cls, procs: list[Process], postmaster: int) -> Cpu:
        return cls(
            time.time(),
            sum(cpu_time(proc.pid) for proc in procs),
            family_time(postmaster),
            self_time(),
            machine_time(),
        )

    def __sub__(self, other: Cpu) -> Cpu:
        pairs = zip(vars(self).values(), vars(other).values(), strict=True)
        return Cpu(*(a - b for a, b in pairs))


@dataclass
class Result:
    name: str
    count: int
    total: float  # seconds from the first next_run until the last build was seen
    delays: list[float]  # seconds from each build's next_run until it was seen
    cpu: Cpu | None = None  # over the part: from its first next_run until the last build

    def line(self) -> str:
        d = sorted(self.delays)
        p99 = d[min(len(d) - 1, int(len(d) * 0.99))]
        return (
            f"{self.name:7} {self.count:6d} builds  all in {self.total:6.2f} s "
            f"({self.count / self.total:7.0f}/s)  delay p50 {statistics.median(d) * 1000:7.1f} ms"
            f"  p99 {p99 * 1000:7.1f} ms  max {d[-1] * 1000:7.1f} ms"
        )

    def cpu_line(self) -> str:
        assert self.cpu is not None
        c = self.cpu
        others = max(c.machine - c.schedulers - c.postgres - c.bench, 0.0)
        return (
            f"{'':7} CPU over {c.wall:5.2f} s: schedulers {c.schedulers:5.2f} s"
            f" ({c.schedulers / self.count * 1e6:4.0f} us/build), PostgreSQL {c.postgres:5.2f} s"
            f" ({c.postgres / self.count * 1e6:4.0f} us/build), bench {c.bench:5.2f} s,"
            f" others {others:5.2f} s; machine busy {c.machine / c.wall / MACHINE_CPUS:4.0%}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crons", type=int, default=100_000, help="cron jobs (100000)")
    parser.add_argument("--due", type=int, default=10_000, help="due at once (10000)")
    parser.add_argument("--stream", type=int, default=2_000, help="streamed runs (2000)")
    parser.add_argument("--spacing", type=float, default=5.0, help="stream spacing, ms (5)")
    parser.add_argument("--schedulers", type=int, default=3, help="processes (3)")
    parser.add_argument("--users", type=int, default=100, help="cron owners (100)")
    args = parser.parse_args()
    if args.due + args.stream > args.crons:
        parser.error("--due plus --stream must not exceed --crons")
    return args


async def prepare(dsn: str, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await db.migrate(conn)
        await conn.execute(
            """
            INSERT INTO users (username, email, password_hash)
            SELECT 'user' || i, 'user' || i || '@example.com', 'x'
            FROM generate_series(1, $1) AS i
            """,
            args.users,
        )
        # Owners round-robin: a build's number comes from its owner's counter row.
        await conn.execute(
            """
            INSERT INTO crons (user_id, author_id, name, schedule, manifest, next_run)
            SELECT u, u, 'job ' || i, 'daily', $2, $3
            FROM generate_series(1, $1) AS i, LATERAL (SELECT 1 + i % $4 AS u) AS o
            """,
            args.crons,
            MANIFEST,
            FAR,
            args.users,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def watch(
    conn: asyncpg.Connection, due: dict[int, datetime], low: int, procs: list[Process]
) -> tuple[Result, int]:
    """Poll until every cron job of `due` has a build; delays per build. Builds commit out of
    id order (one transaction per batch, several schedulers), so the poll asks for ids above
    `low`, the highest id below which every build has been seen."""
    seen: dict[int, float] = {}
    ids: set[int] = set()
    deadline = time.time() + 120
    while len(seen) < len(due):
        rows = await conn.fetch("SELECT id, cron_id FROM builds WHERE id > $1", low)
        now = time.time()
        for row in rows:
            if row["id"] not in ids:
                ids.add(row["id"])
                seen[row["cron_id"]] = now
        while low + 1 in ids:
            low += 1
        if now > deadline:
            raise SystemExit(f"bench: only {len(seen)} of {len(due)} builds after 120 s")
        for proc in procs:
            proc.check_alive("during the run")
        await asyncio.sleep(POLL)
    delays = [seen[c] - due[c].timestamp() for c in due]
    first = min(t.timestamp() for t in due.values())
    return Result("", len(due), max(seen.values()) - first, delays), low


async def cpu_at(when: datetime, procs: list[Process], postmaster: int) -> Cpu:
    """The CPU counters at `when` (no build can exist before it)."""
    await asyncio.sleep(max((when - datetime.now(UTC)).total_seconds(), 0.0))
    return Cpu.now(procs, postmaster)


async def measure(
    dsn: str, args: argparse.Namespace, procs: list[Process], postmaster: int
) -> list[Result]:
    conn = await asyncpg.connect(dsn)
    try:
        await asyncio.sleep(2)  # the schedulers connect and find nothing due
        t0 = datetime.now(UTC) + timedelta(seconds=LEAD)
        await conn.execute("UPDATE crons SET next_run = $2 WHERE id <= $1", args.due, t0)
        before = await cpu_at(t0, procs, postmaster)
        burst, last_id = await watch(conn, dict.fromkeys(range(1, args.due + 1), t0), 0, procs)
        burst.name, burst.cpu = "burst", Cpu.now(procs, postmaster) - before
        start = datetime.now(UTC) + timedelta(seconds=LEAD)
        stream = {
            args.due + 1 + i: start + timedelta(milliseconds=i * args.spacing)
            for i in range(args.stream)
        }
        await conn.executemany("UPDATE crons SET next_run = $2 WHERE id = $1", list(stream.items()))
        before = await cpu_at(start, procs, postmaster)
        flow, _ = await watch(conn, stream, last_id, procs)
        flow.name, flow.cpu = "stream", Cpu.now(procs, postmaster) - before
        builds, runs, crons = await conn.fetchrow(
            """
            SELECT (SELECT count(*) FROM builds), (SELECT count(*) FROM cron_runs),
                   (SELECT count(DISTINCT cron_id) FROM builds)
            """
        )
        expected = args.due + args.stream
        if not builds == runs == crons == expected:
            raise SystemExit(
                f"bench: not exactly once: {builds} builds, {runs} runs, {crons} cron jobs"
                f" with a build; expected {expected} of each"
            )
        return [burst, flow]
    finally:
        await conn.close()


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[Result]:
    directory, cluster = throwaway_cluster(stack, "marid-bench-scheduler-")
    asyncio.run(create_database(cluster, "marid"))
    dsn = cluster.dsn("marid")
    print(f"bench: {args.crons} cron jobs for {args.users} users ...", file=sys.stderr)
    asyncio.run(prepare(dsn, args))
    config = write_marid_config(directory / "marid.yml", dsn, free_port(), cron={"interval": "1s"})
    procs = [
        Process(f"scheduler {i}", marid_argv("scheduler", config), directory / f"s{i}.log")
        for i in range(args.schedulers)
    ]
    for proc in procs:
        stack.callback(proc.stop)
        proc.start()
    return asyncio.run(measure(dsn, args, procs, postmaster_pid(cluster)))


def main() -> None:
    args = parse_args()
    results = guarded(lambda stack: run(args, stack))
    print(
        f"{args.crons} cron jobs, {args.schedulers} schedulers, {MACHINE_CPUS} CPUs"
        f" ({cpu_model()}); delays over-estimated by up to {POLL * 1000:.0f} ms (polling)"
    )
    for result in results:
        print(result.line())
        print(result.cpu_line())
    print("exactly once: one build and one cron_runs row per fired cron job")


if __name__ == "__main__":
    main()
