"""Benchmark of the auth path under a password-guessing load (issue 11 rows 6 and 10).

A throwaway PostgreSQL cluster (durable settings) holds one migrated database with the
attacked user, VICTIM, and USERS other users (one precomputed scrypt hash for all of them).
Each attack runs against a fresh `marid serve` process (its rate limiter lives in memory, so
every attack starts with whole budgets) on 127.0.0.1, for SECONDS with CLIENTS clients on
keep-alive connections, each sending `GET /api/tokens` with HTTP Basic credentials and a wrong
password as fast as the answers come:

- limit on (marid's defaults, `rate_limit.failed_logins` per `rate_limit.window`):
  one user from one address; many users from one address; one user from many addresses and
  many users from many addresses (X-Forwarded-For with `rate_limit.trusted_proxies`
  127.0.0.1 stands for the addresses);
- limit off (`rate_limit.enabled: false`): one user from one address, the rate an unthrottled
  attacker gets, bound by the KDF.

Only an answer other than 429 can have reached scrypt (a throttled login is refused before any
hashing), so guesses that reach scrypt are the 401s and 200s. The cross-check: CPU time of the
server's threads other than its main thread (scrypt runs in `asyncio.to_thread`, nothing else
there during these attacks) divided by one scrypt's CPU time, measured in this process first.

After the one-user attack, the right password is sent while throttled (must answer 429, not
200), and throttled answers are timed for right and wrong passwords. Last, with the limit off,
the latency of a wrong password for an existing user against an unknown user name, sequential
and interleaved (row 10: both pay one scrypt, so about equal).

    .venv/bin/python bench/login.py [--seconds N] [--clients C] [--latency-requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import math
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from common import (
    CLOCK_TICKS,
    MACHINE_CPUS,
    Process,
    cpu_model,
    cpu_time,
    create_database,
    family_time,
    guarded,
    machine_time,
    marid_argv,
    postmaster_pid,
    self_time,
    throwaway_cluster,
    write_marid_config,
)

from marid import db, users
from marid.config import RateLimitConfig
from marid.pgcluster import Cluster, free_port

DATABASE = "marid"
VICTIM, VICTIM_PASSWORD = "victim", "correct horse battery staple"
OTHER_PASSWORD = "another password"  # every other user's
PATH = "/api/tokens"  # accepts HTTP Basic (docs/api.md §1.5, §18)
THROTTLED = "Too many failed logins, try again later"
RATE_LIMITED = "Rate limit exceeded"
READY_TIMEOUT = 30.0
CALIBRATION = 10  # scrypt checks timed in this process
DEFAULTS = RateLimitConfig()


@dataclass(frozen=True)
class Attack:
    name: str
    limit: bool
    many_users: bool = False
    many_addresses: bool = False  # X-Forwarded-For, one address per request

    @property
    def label(self) -> str:
        return f"{self.name} (limit {'on' if self.limit else 'off'})"


ATTACKS = [
    Attack("one user, one address", limit=True),
    Attack("many users, one address", limit=True, many_users=True),
    Attack("one user, many addresses", limit=True, many_addresses=True),
    Attack("many users, many addresses", limit=True, many_users=True, many_addresses=True),
    Attack("one user, one address", limit=False),
]


@dataclass
class Outcome:
    attack: Attack
    seconds: float
    answers: Counter[str] = field(default_factory=Counter)  # "200", "401", "429 login", ...
    latencies: dict[str, list[float]] = field(default_factory=dict)  # by answer, seconds
    windows: int = 1  # fixed rate-limit windows the attack touched
    server_cpu: float = 0.0
    worker_cpu: float = 0.0  # threads other than the server's main one: scrypt
    postgres_cpu: float = 0.0
    client_cpu: float = 0.0
    others_cpu: float = 0.0  # the rest of the machine, hypervisor steal included

    @property
    def others(self) -> float:
        """The share of the machine other processes took: noise when not near 0."""
        return self.others_cpu / (self.seconds * MACHINE_CPUS)

    @property
    def sent(self) -> int:
        return sum(self.answers.values())

    @property
    def reached(self) -> int:
        """Answers that can have come from a password check: all but the 429s."""
        return self.answers["200"] + self.answers["401"]

    def scrypts(self, scrypt_cpu: float) -> float:
        """Password checks the worker threads' CPU time amounts to."""
        return self.worker_cpu / scrypt_cpu

    def budget(self) -> int | None:
        """Most guesses the limit lets through: failed_logins per key and window, the
        tightest key being the one user or the one address (None when neither is fixed)."""
        if not self.attack.limit or (self.attack.many_users and self.attack.many_addresses):
            return None
        return DEFAULTS.failed_logins * self.windows


@dataclass
class Findings:
    lines: list[str] = field(default_factory=list)  # what is wrong, printed at the end

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.lines.append(message)
            print(f"  PROBLEM: {message}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per attack (1-300)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (1-256)")
    parser.add_argument(
        "--latency-requests",
        type=int,
        default=300,
        help="sequential requests for each of known and unknown user (10-5000)",
    )
    parser.add_argument("--users", type=int, default=2000, help="other users (10-100000)")
    args = parser.parse_args()
    for name, low, high in [
        ("seconds", 1, 300),
        ("clients", 1, 256),
        ("latency_requests", 10, 5000),
        ("users", 10, 100_000),
    ]:
        if not low <= getattr(args, name) <= high:
            parser.error(f"--{name.replace('_', '-')} must be between {low} and {high}")
    return args


def calibrate() -> float:
    """CPU seconds of one scrypt password check here (median of CALIBRATION)."""
    stored = users.hash_password(VICTIM_PASSWORD)
    times = []
    for _ in range(CALIBRATION):
        start = time.thread_time()
        users.verify_password("a wrong guess", stored)
        times.append(time.thread_time() - start)
    return statistics.median(times)


async def prepare(cluster: Cluster, population: int) -> None:
    await create_database(cluster, DATABASE)
    conn = await asyncpg.connect(cluster.dsn(DATABASE), server_settings={"timezone": "UTC"})
    try:
        await db.migrate(conn)
        await users.create(conn, VICTIM, "victim@example.com", VICTIM_PASSWORD)
        await conn.execute(
            """
            INSERT INTO users (username, email, password_hash)
            SELECT 'user' || g, 'user' || g || '@example.com', $2
            FROM generate_series(1, $1) g
            """,
            population,
            users.hash_password(OTHER_PASSWORD),
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def basic(username: str, password: str) -> dict[str, str]:
    value = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {value}"}


def forwarded(n: int) -> str:
    """The n-th client address, from 198.18.0.0/15 (RFC 2544, for benchmarks); only ever
    written into X-Forwarded-For, never connected to."""
    n %= 2**17
    return f"198.{18 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"


def main_thread_time(pid: int) -> float:
    """CPU seconds of the main thread of `pid` (whose thread id is the pid)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Server:
    process: Process
    base: str  # http://127.0.0.1:PORT

    @property
    def url(self) -> str:
        return self.base + PATH

    async def ask(
        self, session: aiohttp.ClientSession, headers: dict[str, str]
    ) -> tuple[str, float]:
        """One request: its answer ("200", "401", "429 login", "429 rate", other statuses as
        they are) and how long it took."""
        start = time.perf_counter()
        try:
            async with session.get(self.url, headers=headers) as resp:
                body = await resp.read()
        except aiohttp.ClientError as exc:
            raise self.process.failure(f"GET {PATH} failed: {exc!r}") from None
        took = time.perf_counter() - start
        answer = str(resp.status)
        if resp.status == 429:
            message = _message(body)
            answer = {THROTTLED: "429 login", RATE_LIMITED: "429 rate"}.get(message, "429 other")
        return answer, took


def _message(body: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(body).get("message", ""))
    return ""


def start_server(directory: Path, dsn: str, attack: Attack, stack: contextlib.ExitStack) -> Server:
    port = free_port()
    limit: dict[str, Any] = {"enabled": attack.limit}
    if attack.many_addresses:
        limit["trusted_proxies"] = ["127.0.0.1"]
    config = write_marid_config(directory / f"marid-{port}.yml", dsn, port, rate_limit=limit)
    process = Process(f"marid serve ({attack.label})", marid_argv("serve", config),
                      directory / f"serve-{port}.log")  # fmt: skip
    stack.callback(process.stop)
    process.start()
    return Server(process, f"http://127.0.0.1:{port}")


async def wait_ready(server: Server, session: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(server.base + "/api/health") as resp:
                if resp.status == 200:
                    return
        server.process.check_alive("at start-up")
        if time.monotonic() > deadline:
            raise server.process.failure(f"not answering after {READY_TIMEOUT:.0f}s")
        await asyncio.sleep(0.1)


def guesses(attack: Attack, population: int) -> Callable[[int], dict[str, str]]:
    """The headers of the n-th guess: always a wrong password."""

    def headers(n: int) -> dict[str, str]:
        username = f"user{n % population + 1}" if attack.many_users else VICTIM
        found = basic(username, f"guess-{n}")
        if attack.many_addresses:
            found["X-Forwarded-For"] = forwarded(n)
        return found

    return headers


async def load(
    server: Server, attack: Attack, args: argparse.Namespace, postmaster: int
) -> Outcome:
    """CLIENTS clients guessing for SECONDS; CPU of the server, its worker threads,
    PostgreSQL and this process over the same span."""
    headers = guesses(attack, args.users)
    outcome = Outcome(attack, args.seconds)
    counter = itertools.count()
    pid = server.process.pid
    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        await wait_ready(server, session)
        if attack.limit:  # the right password is right (and, forgiven, costs no budget)
            answer, _ = await server.ask(session, basic(VICTIM, VICTIM_PASSWORD))
            if answer != "200":
                raise server.process.failure(f"the right password answered {answer}")
        before = (
            cpu_time(pid),
            main_thread_time(pid),
            family_time(postmaster),
            self_time(),
            machine_time(),
        )
        start_wall, start = time.time(), time.monotonic()

        async def client() -> None:
            while True:
                answer, took = await server.ask(session, headers(next(counter)))
                outcome.answers[answer] += 1
                outcome.latencies.setdefault(answer, []).append(took)

        # Answers that come by the deadline count, and CPU up to it; then the clients stop,
        # their requests in flight abandoned.
        tasks = [asyncio.create_task(client()) for _ in range(args.clients)]
        done, _ = await asyncio.wait(tasks, timeout=args.seconds)
        outcome.seconds = time.monotonic() - start
        end_wall = time.time()
        after = (
            cpu_time(pid),
            main_thread_time(pid),
            family_time(postmaster),
            self_time(),
            machine_time(),
        )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:  # a client ends early only on an error
            task.result()
    outcome.server_cpu = after[0] - before[0]
    outcome.worker_cpu = outcome.server_cpu - (after[1] - before[1])
    outcome.postgres_cpu = after[2] - before[2]
    outcome.client_cpu = after[3] - before[3]
    outcome.others_cpu = max(
        0.0,
        after[4] - before[4] - outcome.server_cpu - outcome.postgres_cpu - outcome.client_cpu,
    )
    window = DEFAULTS.window
    outcome.windows = math.floor(end_wall / window) - math.floor(start_wall / window) + 1
    server.process.check_alive("after the attack")
    return outcome


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (1-99) of `values`."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report(outcome: Outcome, scrypt_cpu: float, findings: Findings) -> None:
    n, s = outcome.sent, outcome.seconds
    answers = ", ".join(f"{k}: {v:,}" for k, v in sorted(outcome.answers.items()))
    print(f"{outcome.attack.label}: {s:.1f} s")
    print(f"  sent           {n:,} requests ({n / s:,.0f}/s); answers {answers}")
    reached = outcome.reached
    line = f"  reach scrypt   {reached:,} ({reached / s:.2f}/s)"
    budget = outcome.budget()
    if budget is not None:
        line += (
            f"; budget {DEFAULTS.failed_logins} per key and window, "
            f"{outcome.windows} window(s) touched: at most {budget}"
        )
    print(line)
    scrypts = outcome.scrypts(scrypt_cpu)
    per_guess = (
        f" = {outcome.worker_cpu / reached * 1000:.0f} ms per guess that reached it"
        if reached
        else ""
    )
    print(
        f"  CPU            server {outcome.server_cpu:.2f} s "
        f"({outcome.server_cpu / max(n, 1) * 1e6:,.0f} µs/request); worker threads (scrypt) "
        f"{outcome.worker_cpu:.2f} s ≈ {scrypts:.1f} checks{per_guess}; PostgreSQL "
        f"{outcome.postgres_cpu:.2f} s; this client {outcome.client_cpu:.2f} s; others "
        f"{outcome.others:.0%} of the machine"
    )
    lat = ", ".join(
        f"{k} {percentile(v, 50) * 1000:.1f}" for k, v in sorted(outcome.latencies.items())
    )
    print(f"  latency p50 ms {lat}", flush=True)
    strange = {k: v for k, v in outcome.answers.items() if k not in ("401", "429 login")}
    findings.check(not strange, f"{outcome.attack.label}: unexpected answers {strange}")
    if budget is not None:
        findings.check(
            reached <= budget,
            f"{outcome.attack.label}: {reached} guesses reached scrypt, over the budget {budget}",
        )
    # Against the answers: the worker threads did about as many checks as the answers say.
    # One check's CPU time grows under contention (16 MiB of memory each), and checks still
    # running at the deadline count in part, so the band is wide; a 429 that hashed would not
    # fit in it (thousands of them).
    findings.check(
        0.5 * reached - 3 <= scrypts <= 2 * reached + 3,
        f"{outcome.attack.label}: worker threads' CPU amounts to {scrypts:.1f} scrypt "
        f"checks, answers say {reached} reached scrypt",
    )


async def throttled_checks(
    server: Server, scrypt_cpu: float, findings: Findings, rounds: int = 50
) -> None:
    """While the victim is throttled: the right password must answer 429 too; throttled
    answers to right and wrong passwords take about the same (no hashing in either)."""
    pid = server.process.pid
    window = DEFAULTS.window
    async with aiohttp.ClientSession(trust_env=False) as session:
        for _ in range(3):  # again if a window ends in between
            begun = time.time()
            wrong = "401"
            for n in range(DEFAULTS.failed_logins + 1):  # spend the budget if a window began
                wrong, _ = await server.ask(session, basic(VICTIM, f"again-{n}"))
                if wrong == "429 login":
                    break
            right, _ = await server.ask(session, basic(VICTIM, VICTIM_PASSWORD))
            if math.floor(begun / window) == math.floor(time.time() / window):
                break
        findings.check(wrong == "429 login", f"the victim was not throttled: {wrong}")
        findings.check(
            right == "429 login",
            f"the right password while throttled answered {right}, expected 429",
        )
        print(f"right password while throttled: {right} (a wrong one: {wrong})")
        times: dict[str, list[float]] = {"right": [], "wrong": []}
        answers: Counter[str] = Counter()
        before = cpu_time(pid) - main_thread_time(pid)
        for n in range(rounds):
            for kind, password in (("right", VICTIM_PASSWORD), ("wrong", f"later-{n}")):
                answer, took = await server.ask(session, basic(VICTIM, password))
                answers[f"{kind} {answer}"] += 1
                times[kind].append(took)
        worker = max(0.0, cpu_time(pid) - main_thread_time(pid) - before)  # ticks: ±0.02 s
    print(
        f"throttled answers, {rounds} each, interleaved: right password p50 "
        f"{percentile(times['right'], 50) * 1000:.2f} ms, wrong p50 "
        f"{percentile(times['wrong'], 50) * 1000:.2f} ms; worker threads {worker:.2f} s CPU; "
        + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())),
        flush=True,
    )
    findings.check(
        set(answers) <= {"right 429 login", "wrong 429 login"},
        f"throttled answers were not all 429: {dict(answers)}",
    )
    findings.check(
        worker < scrypt_cpu + 0.02,
        f"worker threads used {worker:.2f} s CPU during {2 * rounds} throttled requests",
    )


async def user_locked_from_elsewhere(server: Server, findings: Findings) -> None:
    """After the many-addresses attack: the right password from an address never seen is
    refused too (the user's own budget is spent)."""
    async with aiohttp.ClientSession(trust_env=False) as session:
        headers = {**basic(VICTIM, VICTIM_PASSWORD), "X-Forwarded-For": "192.0.2.1"}
        answer, _ = await server.ask(session, headers)
    print(f"right password from a new address after this attack: {answer}", flush=True)
    findings.check(answer == "429 login", f"right password from a new address: {answer}")


@dataclass
class Latency:
    known: list[float]  # seconds
    unknown: list[float]


async def latency(server: Server, count: int) -> Latency:
    """Row 10: sequential wrong passwords, interleaved, for an existing user and for user
    names that do not exist (a new one each time)."""
    async with aiohttp.ClientSession(trust_env=False) as session:
        await wait_ready(server, session)
        known: list[float] = []
        unknown: list[float] = []
        for n in range(-10, count):  # 10 of each first, not counted
            for sample, name in ((known, VICTIM), (unknown, f"nobody{n + 10}")):
                answer, took = await server.ask(session, basic(name, f"wrong-{n}"))
                if answer != "401":
                    raise server.process.failure(f"a wrong password for {name} answered {answer}")
                if n >= 0:
                    sample.append(took)
    return Latency(known, unknown)


def report_latency(result: Latency, scrypt_cpu: float, findings: Findings) -> None:
    print(f"wrong password, limit off, {len(result.known)} sequential requests each, interleaved:")
    for name, sample in (("existing user", result.known), ("unknown user ", result.unknown)):
        print(
            f"  {name}  p50 {percentile(sample, 50) * 1000:6.1f} ms  "
            f"p90 {percentile(sample, 90) * 1000:6.1f} ms  "
            f"min {min(sample) * 1000:6.1f} ms"
        )
    gap = percentile(result.unknown, 50) - percentile(result.known, 50)
    print(
        f"  unknown - existing, p50: {gap * 1000:+.1f} ms "
        f"({gap / scrypt_cpu:+.2f} of one scrypt's CPU time)",
        flush=True,
    )
    findings.check(
        abs(gap) < 0.25 * scrypt_cpu,
        f"an unknown user's answer differs from a known one's by {gap * 1000:+.1f} ms (p50)",
    )


def summarise(outcomes: list[Outcome], scrypt_cpu: float) -> None:
    print()
    print(
        f"{'attack':28}{'limit':>6}{'sent/s':>9}{'reach scrypt':>14}{'/s':>8}"
        f"{'≈ by CPU':>10}{'budget':>8}{'others':>8}"
    )
    for o in outcomes:
        budget = o.budget()
        print(
            f"{o.attack.name:28}{'on' if o.attack.limit else 'off':>6}"
            f"{o.sent / o.seconds:9,.0f}{o.reached:14,}{o.reached / o.seconds:8.2f}"
            f"{o.scrypts(scrypt_cpu):10.1f}{budget if budget is not None else '-':>8}"
            f"{o.others:8.0%}"
        )
    print("(≈ by CPU: the server's worker-thread CPU time over one check's; others: the share")
    print(" of the machine other processes took)")
    limited, free = outcomes[0], outcomes[-1]
    steady = DEFAULTS.failed_logins / DEFAULTS.window
    print(
        f"one user from one address: {free.reached / free.seconds:.1f} guesses/s reach scrypt "
        f"without the limit; with it {limited.reached} in {limited.seconds:.0f} s "
        f"({limited.reached / limited.seconds:.2f}/s), at most {steady:.3f}/s in the long run "
        f"({free.reached / free.seconds / steady:,.0f} times fewer)"
    )


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    scrypt_cpu = calibrate()
    print(
        f"auth path under password guessing: {MACHINE_CPUS} CPUs ({cpu_model()}), Python "
        f"{platform.python_version()}, aiohttp {aiohttp.__version__}; {args.clients} clients, "
        f"{args.seconds:.0f} s per attack, GET {PATH} with HTTP Basic"
    )
    print(
        f"scrypt (N={users.SCRYPT_N}, r={users.SCRYPT_R}, p={users.SCRYPT_P}): "
        f"{scrypt_cpu * 1000:.1f} ms CPU per check in this process (median of {CALIBRATION}); "
        f"limit: rate_limit.failed_logins {DEFAULTS.failed_logins} per "
        f"{DEFAULTS.window:.0f} s window (defaults)",
        flush=True,
    )
    directory, cluster = throwaway_cluster(stack, "marid-bench-login-")
    asyncio.run(prepare(cluster, args.users))
    dsn = cluster.dsn(DATABASE)
    postmaster = postmaster_pid(cluster)
    findings = Findings()
    outcomes: list[Outcome] = []
    latencies: Latency | None = None
    for attack in ATTACKS:
        with contextlib.ExitStack() as server_stack:
            server = start_server(directory, dsn, attack, server_stack)
            print()
            outcome = asyncio.run(load(server, attack, args, postmaster))
            outcomes.append(outcome)
            report(outcome, scrypt_cpu, findings)
            if attack.limit and not attack.many_users and not attack.many_addresses:
                asyncio.run(throttled_checks(server, scrypt_cpu, findings))
            if attack.limit and attack.many_addresses and not attack.many_users:
                asyncio.run(user_locked_from_elsewhere(server, findings))
            if not attack.limit:
                print()
                latencies = asyncio.run(latency(server, args.latency_requests))
                report_latency(latencies, scrypt_cpu, findings)
            server.process.check_alive("at the end")
    summarise(outcomes, scrypt_cpu)
    if findings.lines:
        print("\nPROBLEMS:\n  " + "\n  ".join(findings.lines))
        raise SystemExit(1)
    print("checked: no 429 reached scrypt, the right password is refused while throttled, "
          "known and unknown users cost the same")  # fmt: skip


def main() -> None:
    args = parse_args()
    guarded(lambda stack: run(args, stack))


if __name__ == "__main__":
    main()
