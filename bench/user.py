"""Benchmark of `GET /api/user` (issue 2): the real marid server against a bare aiohttp handler.

A throwaway PostgreSQL cluster with durable settings holds one migrated database: POPULATION
users with a token each, plus the benchmark's own user and token. Two single-process servers
listen on loopback free ports, `marid serve` and bench/bare.py (one indexed SELECT), with
pools of the same size. Each is checked to answer 200 with the expected body, warmed up, then
loaded by the same wrk settings in rounds of ABBA order (marid, bare, bare, marid, ...) so
drift hits both alike. Prints requests/s (median of the rounds), p50/p99 latency and the ratio
marid/bare. Everything it started is stopped and removed on exit, Ctrl-C and errors included.

    .venv/bin/python bench/user.py [--seconds N] [--concurrency C] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import bare  # bench/bare.py: this script's directory is first on sys.path
from common import (
    MACHINE_CPUS,
    BenchError,
    Process,
    children_time,
    cpu_model,
    cpu_time,
    create_database,
    family_time,
    guarded,
    machine_time,
    marid_argv,
    postmaster_pid,
    throwaway_cluster,
    write_marid_config,
)

from marid import db, scopes, tokens, users
from marid.pgcluster import Cluster, free_port

HERE = Path(__file__).resolve().parent
DATABASE = "marid_bench"
POPULATION = 10_000  # other users and tokens, so both lookups go through real indexes
READY_TIMEOUT = 30.0
QUIET = 0.05  # a round pair is quiet when other processes took less of the machine than this


@dataclass(frozen=True)
class Fixture:
    user_id: int
    token: str
    body: dict[str, Any]  # what GET /api/user must answer, from either server
    plan: str  # EXPLAIN of the bare server's query


@dataclass
class Server(Process):
    """One server process on 127.0.0.1:`port`."""

    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{bare.PATH}"


@dataclass
class Round:
    server: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu: float  # CPU seconds the server process used during the round
    postgres_cpu: float  # CPU seconds of the postmaster and its backends during the round
    others_cpu: float  # CPU seconds of other processes (not wrk) and of hypervisor steal

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def server_us(self) -> float:
        """Server CPU per request, in microseconds: steadier than requests/s when other
        processes compete for the machine, though contention inflates it too."""
        return self.server_cpu / self.requests * 1e6

    @property
    def postgres_us(self) -> float:
        return self.postgres_cpu / self.requests * 1e6

    @property
    def others(self) -> float:
        """The share of the machine that other processes took: noise when not near 0."""
        return self.others_cpu / (self.seconds * MACHINE_CPUS)

    @property
    def busy(self) -> float:
        """The server's CPU use as a share of one core; near 1.0 when it is the bottleneck."""
        return self.server_cpu / self.seconds


@dataclass
class Results:
    rounds: dict[str, list[Round]] = field(default_factory=dict)

    def add(self, result: Round) -> None:
        self.rounds.setdefault(result.server, []).append(result)

    def median(self, server: str, attribute: str) -> float:
        return statistics.median(getattr(r, attribute) for r in self.rounds[server])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of a round (1-120)")
    parser.add_argument(
        "--rounds", type=int, default=6, help="rounds per server, ABBA order (1-20)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up (0-60)")
    parser.add_argument("--concurrency", type=int, default=32, help="wrk connections (1-1000)")
    parser.add_argument("--pool-size", type=int, default=10, help="asyncpg pool of each server")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="marid's logging.level (default: info, marid's own default)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin servers and wrk to separate cores"
    )
    args = parser.parse_args()
    for name, low, high in [
        ("seconds", 1, 120),
        ("rounds", 1, 20),
        ("warmup", 0, 60),
        ("concurrency", 1, 1000),
        ("pool_size", 1, 100),
    ]:
        if not low <= getattr(args, name) <= high:
            parser.error(f"--{name.replace('_', '-')} must be between {low} and {high}")
    return args


async def prepare(cluster: Cluster) -> Fixture:
    """Create and fill the database; returns the benchmark user's token and expected body."""
    await create_database(cluster, DATABASE)
    conn = await asyncpg.connect(cluster.dsn(DATABASE), server_settings={"timezone": "UTC"})
    try:
        await db.migrate(conn)
        async with conn.transaction():
            await conn.execute(
                """
                INSERT INTO users (username, email, password_hash)
                SELECT 'user' || g, 'user' || g || '@example.com', 'not-a-hash'
                FROM generate_series(1, $1) g
                """,
                POPULATION,
            )
            await conn.execute(
                """
                INSERT INTO tokens (user_id, name, scope, digest)
                SELECT id, 'other', 'build:read', encode(sha256(('token' || id)::bytea), 'hex')
                FROM users
                """
            )
            user = await users.create(conn, "bench", "bench@example.com", "bench-password")
            _, value = await tokens.create(conn, user, "bench", scopes.FULL)
        await conn.execute("ANALYZE")
        rows = await conn.fetch("EXPLAIN " + bare.SELECT_USER, user.id)
        plan = "; ".join(r[0].strip() for r in rows)
    finally:
        await conn.close()
    if "Index" not in plan:
        raise BenchError(f"the bare server's query does not use an index: {plan}")
    return Fixture(user.id, value, users.to_json(user), plan)


def marid_server(
    directory: Path, cluster: Cluster, args: argparse.Namespace, cpus: set[int] | None
) -> Server:
    port = free_port()
    path = write_marid_config(
        directory / "marid.yml",
        cluster.dsn(DATABASE),
        port,
        database={"pool_size": args.pool_size},
        logging={"level": args.log_level},
    )
    argv = marid_argv("serve", path)
    return Server("marid", argv, directory / "marid.log", cpus, port=port)


def bare_server(
    directory: Path, cluster: Cluster, args: argparse.Namespace, user_id: int, cpus: set[int] | None
) -> Server:
    port = free_port()
    argv = [
        sys.executable,
        str(HERE / "bare.py"),
        "--dsn", cluster.dsn(DATABASE),
        "--port", str(port),
        "--pool-size", str(args.pool_size),
        "--user-id", str(user_id),
    ]  # fmt: skip
    return Server("bare", argv, directory / "bare.log", cpus, port=port)


async def get(session: aiohttp.ClientSession, url: str, token: str) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.get(url, headers=headers) as resp:
        return resp.status, resp.content_type, await resp.text()


async def check(server: Server, fixture: Fixture) -> None:
    """Wait until `server` answers, then require 200 with the expected JSON body, 3 times."""
    deadline = time.monotonic() + READY_TIMEOUT
    async with aiohttp.ClientSession(trust_env=False) as session:
        while True:
            assert server.proc is not None
            if server.proc.poll() is not None:
                raise server.failure(f"exited with status {server.proc.returncode}")
            try:
                await get(session, server.url, fixture.token)
                break
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline:
                    raise server.failure(f"not answering after {READY_TIMEOUT:.0f}s") from None
                await asyncio.sleep(0.1)
        for _ in range(3):
            status, content_type, text = await get(session, server.url, fixture.token)
            try:
                body = json.loads(text)
            except ValueError:
                body = text
            if status != 200 or content_type != "application/json" or body != fixture.body:
                raise server.failure(
                    f"GET {server.url} answered {status} {content_type} {text!r}, "
                    f"expected 200 application/json {fixture.body!r}"
                )


def wrk(server: Server, token: str, seconds: int, concurrency: int, postmaster: int) -> Round:
    """Load `server` for `seconds` with wrk (on this process's CPUs); raises BenchError on any
    failed request."""
    assert server.proc is not None
    before = (
        cpu_time(server.proc.pid),
        family_time(postmaster),
        children_time(),
        machine_time(),
    )
    argv = [
        "wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "5s",
        "-s", str(HERE / "report.lua"),
        "-H", f"Authorization: Bearer {token}",
        server.url,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    server_cpu = cpu_time(server.proc.pid) - before[0]
    postgres_cpu = family_time(postmaster) - before[1]
    wrk_cpu = children_time() - before[2]
    others_cpu = machine_time() - before[3] - server_cpu - postgres_cpu - wrk_cpu
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    report = json.loads(lines[-1])
    failed = {k: report[k] for k in ("connect", "read", "write", "status", "timeout") if report[k]}
    if failed:
        raise server.failure(f"{failed} of {report['requests']} requests failed under load")
    return Round(
        server.name,
        report["requests"],
        report["duration_us"] / 1e6,
        report["p50_us"] / 1000,
        report["p99_us"] / 1000,
        server_cpu,
        postgres_cpu,
        max(others_cpu, 0.0),
    )


def split_cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, client CPUs): the servers get the last core, wrk and PostgreSQL the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> Results:
    if shutil.which("wrk") is None:
        raise BenchError("wrk not found: apt-get install wrk")
    server_cpus, client_cpus = split_cpus(not args.no_pin)
    if client_cpus:
        # Inherited by PostgreSQL (started next) and by wrk; each server is moved on start.
        os.sched_setaffinity(0, client_cpus)
    directory, cluster = throwaway_cluster(stack, "marid-bench-")
    fixture = asyncio.run(prepare(cluster))
    postmaster = postmaster_pid(cluster)
    servers = [
        marid_server(directory, cluster, args, server_cpus),
        bare_server(directory, cluster, args, fixture.user_id, server_cpus),
    ]
    for server in servers:
        stack.callback(server.stop)
        server.start()
    for server in servers:
        asyncio.run(check(server, fixture))
    describe(args, server_cpus, client_cpus, fixture)
    results = measure(servers, fixture.token, args, postmaster)
    for server in servers:
        server.check_alive("during the benchmark")
    return results


def measure(
    servers: list[Server], token: str, args: argparse.Namespace, postmaster: int
) -> Results:
    """Warm each server up, then load them in ABBA order, printing each round."""
    for server in servers:
        if args.warmup:
            wrk(server, token, args.warmup, args.concurrency, postmaster)
    results = Results()
    for number in range(args.rounds):
        for server in servers if number % 2 == 0 else servers[::-1]:
            result = wrk(server, token, args.seconds, args.concurrency, postmaster)
            results.add(result)
            print(
                f"round {number + 1} {server.name:5}  {result.rate:8.0f} req/s  "
                f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
                f"server {result.server_us:4.0f} µs/req ({result.busy:4.0%} of a core)  "
                f"PostgreSQL {result.postgres_us:4.0f} µs/req  "
                f"others {result.others:4.0%} of the machine",
                flush=True,
            )
    return results


def describe(
    args: argparse.Namespace,
    server_cpus: set[int] | None,
    client_cpus: set[int] | None,
    fixture: Fixture,
) -> None:
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    pinning = (
        f"servers on CPU {sorted(server_cpus)}, wrk and PostgreSQL on CPU {sorted(client_cpus)}"
        if server_cpus and client_cpus
        else "none"
    )
    print(f"machine:     {os.cpu_count()} CPUs, {cpu_model()}")
    print(f"software:    Python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
          f"asyncpg {asyncpg.__version__}, {wrk_version.split(' [')[0].strip()}")  # fmt: skip
    print(f"pinning:     {pinning}")
    print(f"load:        wrk -t1 -c{args.concurrency}, {args.rounds} rounds of {args.seconds}s "
          f"per server (ABBA order) after {args.warmup}s warm-up; pool size {args.pool_size}; "
          f"marid logging.level {args.log_level}")  # fmt: skip
    print(f"bare query:  {fixture.plan}")
    print("checked:     both answer 200 with", json.dumps(fixture.body), flush=True)


def summarise(results: Results) -> None:
    print()
    print(
        f"{'server':8}{'req/s':>8}{'min':>8}{'max':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'server µs/req':>15}{'busy':>7}{'PostgreSQL µs/req':>19}{'others':>8}"
    )
    for name, rounds in results.rounds.items():
        rates = [r.rate for r in rounds]
        print(
            f"{name:8}{statistics.median(rates):8.0f}{min(rates):8.0f}{max(rates):8.0f}"
            f"{results.median(name, 'p50_ms'):9.2f}{results.median(name, 'p99_ms'):9.2f}"
            f"{results.median(name, 'server_us'):15.0f}{results.median(name, 'busy'):7.0%}"
            f"{results.median(name, 'postgres_us'):19.0f}{results.median(name, 'others'):8.0%}"
        )
    print("(medians over the rounds; min and max are of req/s)")
    ratio = results.median("marid", "rate") / results.median("bare", "rate")
    paired = zip(results.rounds["marid"], results.rounds["bare"], strict=True)
    pairs = [m.rate / b.rate for m, b in paired]
    cost = results.median("bare", "server_us") / results.median("marid", "server_us")
    verdict = "meets" if ratio >= 0.5 else "misses"
    print(
        f"ratio marid/bare, requests/s: {ratio:.2f} (per round {min(pairs):.2f}-{max(pairs):.2f}); "
        f"{verdict} the 0.5 target"
    )
    print(f"ratio marid/bare, server CPU per request inverted: {cost:.2f}")
    paired = zip(results.rounds["marid"], results.rounds["bare"], strict=True)
    quiet = [m.rate / b.rate for m, b in paired if max(m.others, b.others) < QUIET]
    if quiet:
        print(
            f"ratio marid/bare, requests/s, in the {len(quiet)} quiet round(s) (others below "
            f"{QUIET:.0%} for both): {statistics.median(quiet):.2f}"
        )


def main() -> None:
    args = parse_args()
    results = guarded(lambda stack: run(args, stack))
    summarise(results)


if __name__ == "__main__":
    main()
