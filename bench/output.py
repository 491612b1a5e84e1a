"""bench/output.py: the job output path (issue 10 part 6), a runner's writes and the API's
memory while it serves one big output.

A throwaway PostgreSQL cluster (durable settings) holds one migrated database with one user
and one os-driver build, claimed as a runner would. The runner's own writer
(`marid.runner.reporter.DbReporter`) then prints SIZE MB of numbered 100-byte lines into the
build's one job through the real database and an fs blob store, and ends the build: the write
rate is the MB printed per second from the first line to the job's output being stored
(live chunks in PostgreSQL, then the blob store). That is measured twice: once with
`builds.max_output` above SIZE (the whole output is kept, the worst case for readers), once
with the default 64 MiB (head and tail kept, the rest dropped as it goes).

Then a real `marid serve` process serves the whole SIZE MB output, and CLIENTS clients at once
read, each in turn: the raw output (`GET …/jobs/s.1/output`), the live event stream of the
finished job (`Accept: text/event-stream`), the build (`GET /b/…`) and its jobs
(`GET /b/…/jobs`), the last two embedding output. The server's resident memory (VmRSS from
/proc, sampled every 20 ms) is reported as its peak during each phase less its level before
any of them.

    .venv/bin/python bench/output.py             # about a minute; --help for the options
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
from common import (
    MACHINE_CPUS,
    Process,
    cpu_model,
    create_database,
    guarded,
    marid_argv,
    throwaway_cluster,
    write_marid_config,
)

from marid import db, lifecycle, manifest, scopes, tokens, users
from marid.blobs import FsStore
from marid.pgcluster import Cluster, free_port
from marid.runner.execute import JobSpec
from marid.runner.reporter import DbReporter, Lease
from marid.submit import Submission, submit

MANIFEST = "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands: [echo hi]\n"
LINE = 100  # bytes per printed line
PIECE = 64 * 1024  # bytes per job_output call, about what a driver's read returns
READY_TIMEOUT = 30.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=200, help="MB the job prints (200)")
    parser.add_argument("--clients", type=int, default=4, help="readers at once (4)")
    return parser.parse_args()


def pieces(size: int) -> list[str]:
    """`size` bytes of numbered lines, in PIECE-byte pieces (the same text each run)."""
    line_count = size // LINE
    per_piece = PIECE // LINE
    out = []
    for first in range(0, line_count, per_piece):
        lines = range(first, min(first + per_piece, line_count))
        out.append("".join(f"{n:010d} {'.' * (LINE - 12)}\n" for n in lines))
    return out


async def prepare(dsn: str) -> str:
    """Migrate; create the user and a full-scope token (returned)."""
    conn = await asyncpg.connect(dsn)
    try:
        await db.migrate(conn)
        user = await users.create(conn, "bench", "bench@example.com", "bench-password")
        _, value = await tokens.create(conn, user, "bench", scopes.FULL)
    finally:
        await conn.close()
    return value


async def write_build(
    dsn: str, blobs: FsStore, texts: list[str], max_output: int
) -> tuple[float, float]:
    """Submit, claim and run one build whose job prints `texts` through the runner's writer;
    returns the seconds from the first text to the last live chunk committed, and to the
    job's output being stored."""
    pool = await db.create_pool(dsn, size=4)
    try:
        async with pool.acquire() as conn, conn.transaction():
            owner = await users.get_by_username(conn, "bench")
            assert owner is not None
            await submit(conn, Submission(owner, owner, None, manifest.parse(MANIFEST)))
        async with pool.acquire() as conn:
            claim = await lifecycle.claim(conn, "bench", ["os"], 600.0)
        assert claim is not None
        reporter = DbReporter(pool, blobs, claim, "http://bench", Lease(600.0), max_output)
        rows = await pool.fetch(
            "SELECT id, name FROM build_jobs WHERE build_id = $1 ORDER BY position",
            claim.build_id,
        )
        took = flushed = 0.0
        for row in rows:
            spec = JobSpec(row["name"], "", id=row["id"])
            await reporter.job_started(spec)
            if row["name"] == "s.1":
                start = time.perf_counter()
                for text in texts:
                    await reporter.job_output(spec, text)
                await reporter.flush()
                flushed = time.perf_counter() - start
                await reporter.job_finished(spec, "passed", ran=True)
                took = time.perf_counter() - start
            else:
                await reporter.job_finished(spec, "passed", ran=True)
        await reporter.build_finished("passed")
        return flushed, took
    finally:
        await pool.close()


def rss(pid: int) -> int:
    """Resident memory of `pid` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def read_all(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    """Bytes of the response body, read in pieces and thrown away."""
    async with session.get(url, headers=headers) as resp:
        resp.raise_for_status()
        total = 0
        async for chunk in resp.content.iter_chunked(256 * 1024):
            total += len(chunk)
        return total


async def phase(
    pid: int, clients: int, url: str, headers: dict[str, str]
) -> tuple[int, float, int]:
    """`clients` readers of `url` at once: (peak RSS, seconds, bytes each client read)."""
    peak = rss(pid)
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss(pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sizes = await asyncio.gather(*(read_all(session, url, headers) for _ in range(clients)))
    took = time.perf_counter() - start
    done.set()
    await sampler
    return max(peak, rss(pid)), took, sizes[0]


async def serve_and_read(
    args: argparse.Namespace, stack: contextlib.ExitStack, directory: Path, cluster: Cluster
) -> None:
    dsn = cluster.dsn("marid")
    token = await prepare(dsn)
    blobs = FsStore(directory / "blobs")
    size = args.size * 1000 * 1000
    texts = pieces(size)
    print(f"the runner's writer, {args.size} MB printed in 64 KiB pieces:")
    for name, cap in (("kept whole", size + 1024**2), ("max_output 64 MiB", 64 * 1024**2)):
        live, stored = await write_build(dsn, blobs, texts, cap)
        print(
            f"  {name:17} {args.size / stored:5.1f} MB/s printed to stored ({stored:5.1f} s);"
            f" live chunks into PostgreSQL {args.size / live:5.1f} MB/s ({live:5.1f} s),"
            f" then the blob store {stored - live:4.1f} s"
        )

    print(
        f"marid serve, {args.clients} clients at once reading build 1 ({args.size} MB of output"
        " in the blob store); RSS before and its peak increase, a fresh server for each:"
    )
    auth = {"Authorization": f"Bearer {token}"}
    phases = [
        ("raw output", "/b/bench/1/jobs/s.1/output", {}),
        ("event stream", "/b/bench/1/jobs/s.1/output", {"Accept": "text/event-stream"}),
        ("GET /b/…", "/b/bench/1", {}),
        ("GET /b/…/jobs", "/b/bench/1/jobs", {}),
    ]
    for name, path, extra in phases:
        with contextlib.ExitStack() as server_stack:
            server, base = await start_server(directory, dsn, server_stack, auth)
            baseline = rss(server.pid)
            peak, took, body = await phase(server.pid, args.clients, base + path, {**auth, **extra})
            server.check_alive(f"after {name}")
        print(
            f"  {name:14} {baseline / 2**20:4.0f} MiB, +{(peak - baseline) / 2**20:5.1f} MiB at"
            f" peak; {body / 1e6:7.1f} MB per client, {took:5.1f} s"
        )


async def start_server(
    directory: Path, dsn: str, stack: contextlib.ExitStack, auth: dict[str, str]
) -> tuple[Process, str]:
    """A `marid serve` process, answering and warmed up on the small build (build 2)."""
    port = free_port()
    config = write_marid_config(
        directory / "marid.yml",
        dsn,
        port,
        storage={"backend": "fs", "path": str(directory / "blobs")},
        logging={"level": "warning"},
    )
    server = Process("marid serve", marid_argv("serve", config), directory / f"serve-{port}.log")
    stack.callback(server.stop)
    server.start()
    base = f"http://127.0.0.1:{port}/api"
    async with aiohttp.ClientSession() as session:
        for _ in range(int(READY_TIMEOUT / 0.1)):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{base}/health") as resp:
                    if resp.status == 200:
                        break
            server.check_alive("at start-up")
            await asyncio.sleep(0.1)
        warm = ("/b/bench/2", "/b/bench/2/jobs", "/b/bench/2/jobs/s.1/output?offset=60000000")
        for _ in range(3):  # as many readers at once as measured: threads, buffers, pool
            for path in warm:
                await asyncio.gather(*(read_all(session, base + path, auth) for _ in range(4)))
        await asyncio.sleep(1.0)  # the reaper's sweep at start is done
    return server, base


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    directory, cluster = throwaway_cluster(stack, "marid-bench-output-")
    asyncio.run(create_database(cluster, "marid"))
    asyncio.run(serve_and_read(args, stack, directory, cluster))


def main() -> None:
    args = parse_args()
    print(f"job output path, {MACHINE_CPUS} CPUs ({cpu_model()}), Python {sys.version.split()[0]}")
    guarded(lambda stack: run(args, stack))


if __name__ == "__main__":
    main()
