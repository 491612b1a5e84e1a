"""Benchmark of webhook delivery (docs/api.md §10.7): how fast queued events reach a receiver.

A throwaway PostgreSQL cluster (durable settings) holds one migrated database with a user, a
namespace and one webhook (with a secret) whose payload URL is a receiver in this script on
127.0.0.1. SCHEDULERS `marid scheduler` processes deliver (webhooks.allow_loopback on). Two
parts, each event queued with marid.webhooks.emit as the API does:

- burst: BURST events queued in one transaction; the time from its commit until the receiver
  has them all, and each event's delay after the commit;
- stream: STREAM events, each in its own transaction, SPACING ms apart; each one's delay from
  its commit to its arrival (the latency of a deliverer that is keeping up).

The receiver answers 200 at once and records arrival times; every body carries its sequence
number, so the script checks each event arrived exactly once and its signature verifies.

    .venv/bin/python bench/webhooks.py [--burst N] [--stream N] [--spacing MS]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import yaml
from aiohttp import web
from common import (
    MACHINE_CPUS,
    BenchError,
    Process,
    cpu_model,
    create_database,
    free_port,
    guarded,
    marid_argv,
    throwaway_cluster,
    write_marid_config,
)

from marid import db, namespaces, outbound, users, webhooks
from marid.crypto import Cipher
from marid.namespaces import NamespaceForm
from marid.pgcluster import Cluster
from marid.validation import Body

SECRET = "bench-secret"
TIMEOUT = 120.0  # seconds a part may take before the benchmark gives up


@dataclass
class Receiver:
    arrived: dict[int, float] = field(default_factory=dict)  # sequence -> time.monotonic()
    duplicates: int = 0
    bad_signatures: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if request.headers.get("X-Djinn-CI-Signature") != expected:
            self.bad_signatures += 1
        sequence = json.loads(body)["sequence"]
        if sequence in self.arrived:
            self.duplicates += 1
        else:
            self.arrived[sequence] = now
        return web.Response()


@dataclass
class Result:
    name: str
    count: int
    total: float  # seconds from the first commit to the last arrival
    delays: list[float]  # seconds, commit to arrival

    def line(self) -> str:
        cuts = statistics.quantiles(self.delays, n=100, method="inclusive")
        return (
            f"{self.name:7} {self.count:6} events  all in {self.total:6.2f} s"
            f" ({self.count / self.total:7.0f}/s)  delay p50 {cuts[49] * 1000:7.1f} ms"
            f"  p99 {cuts[98] * 1000:7.1f} ms  max {max(self.delays) * 1000:7.1f} ms"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--burst", type=int, default=5000, help="events queued at once (5000)")
    parser.add_argument("--stream", type=int, default=1000, help="events one by one (1000)")
    parser.add_argument("--spacing", type=float, default=10.0, help="stream spacing, ms (10)")
    parser.add_argument("--schedulers", type=int, default=1, help="processes (1)")
    return parser.parse_args()


async def prepare(dsn: str, url: str, key: str) -> int:
    """The namespace id whose webhook points at the receiver."""
    conn = await asyncpg.connect(dsn)
    try:
        await db.migrate(conn)
        user = await users.create(conn, "bench", "bench@example.com", "password1")
        ns = await namespaces.create(conn, user, NamespaceForm.parse(Body({"name": "hooks"})))
        body = Body({"payload_url": url, "secret": SECRET, "events": ["objects"]})
        form = webhooks.WebhookForm.parse(body, outbound.Policy(allow_loopback=True), None)
        await webhooks.create(conn, Cipher(key), user, ns, form)
        return ns.id
    finally:
        await conn.close()


async def measure(dsn: str, ns_id: int, receiver: Receiver, args: argparse.Namespace,
                  procs: list[Process]) -> list[Result]:  # fmt: skip
    conn = await asyncpg.connect(dsn)
    try:
        await asyncio.sleep(2)  # the schedulers are listening
        results = [await burst(conn, ns_id, receiver, args.burst, procs)]
        results.append(await stream(conn, ns_id, receiver, args, procs))
    finally:
        await conn.close()
    if receiver.duplicates or receiver.bad_signatures:
        raise BenchError(
            f"{receiver.duplicates} duplicates, {receiver.bad_signatures} bad signatures"
        )
    return results


async def arrival(receiver: Receiver, wanted: range, procs: list[Process]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not all(n in receiver.arrived for n in wanted):
        for proc in procs:
            proc.check_alive("while delivering")
        if time.monotonic() > deadline:
            missing = sum(n not in receiver.arrived for n in wanted)
            raise BenchError(f"{missing} events not delivered within {TIMEOUT:.0f}s")
        await asyncio.sleep(0.005)


async def burst(conn: asyncpg.Connection, ns_id: int, receiver: Receiver, count: int,
                procs: list[Process]) -> Result:  # fmt: skip
    async with conn.transaction():
        for n in range(count):
            await webhooks.emit(conn, ns_id, "objects", {"sequence": n})
    committed = time.monotonic()
    wanted = range(count)
    await arrival(receiver, wanted, procs)
    delays = [receiver.arrived[n] - committed for n in wanted]
    return Result("burst", count, max(delays), delays)


async def stream(conn: asyncpg.Connection, ns_id: int, receiver: Receiver,
                 args: argparse.Namespace, procs: list[Process]) -> Result:  # fmt: skip
    first = args.burst
    committed: dict[int, float] = {}
    start = time.monotonic()
    for i in range(args.stream):
        await asyncio.sleep(max(0.0, start + i * args.spacing / 1000 - time.monotonic()))
        await webhooks.emit(conn, ns_id, "objects", {"sequence": first + i})  # autocommit
        committed[first + i] = time.monotonic()
    wanted = range(first, first + args.stream)
    await arrival(receiver, wanted, procs)
    delays = [receiver.arrived[n] - committed[n] for n in wanted]
    return Result("stream", args.stream, max(receiver.arrived[n] for n in wanted) - start, delays)


async def serve_and_measure(
    args: argparse.Namespace, stack: contextlib.ExitStack, directory: Path, cluster: Cluster
) -> list[Result]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        dsn = cluster.dsn("marid")
        config = write_marid_config(
            directory / "marid.yml", dsn, free_port(), webhooks={"allow_loopback": True}
        )
        key = _crypto_key(config)
        ns_id = await prepare(dsn, f"http://127.0.0.1:{port}/hook", key)
        procs = [
            Process(f"scheduler {i}", marid_argv("scheduler", config), directory / f"s{i}.log")
            for i in range(args.schedulers)
        ]
        for proc in procs:
            stack.callback(proc.stop)
            proc.start()
        return await measure(dsn, ns_id, receiver, args, procs)
    finally:
        await runner.cleanup()


def _crypto_key(config_path: Path) -> str:
    return str(yaml.safe_load(config_path.read_text())["crypto"]["key"])


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[Result]:
    directory, cluster = throwaway_cluster(stack, "marid-bench-webhooks-")
    asyncio.run(create_database(cluster, "marid"))
    return asyncio.run(serve_and_measure(args, stack, directory, cluster))


def main() -> None:
    args = parse_args()
    results = guarded(lambda stack: run(args, stack))
    print(
        f"webhook delivery, {args.schedulers} scheduler(s), {MACHINE_CPUS} CPUs ({cpu_model()}),"
        " receiver on 127.0.0.1 answering 200 at once"
    )
    for result in results:
        print(result.line())
    print("exactly once, signatures verified")


if __name__ == "__main__":
    main()
