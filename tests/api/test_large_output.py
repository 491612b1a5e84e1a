"""Large job output through the API (issue 10 part 6, docs/api.md §7.1, §19): a live reader
that follows a job over builds.max_output across its end, and outputs stored before migration
0014 read back from where it moved them. Real PostgreSQL, real fs blob store, the runner's
own writer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import yaml
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid import db, lifecycle, manifest, scopes, tokens, users
from marid.api.app import create_app
from marid.blobs import open_store
from marid.config import Config
from marid.pgcluster import Cluster, free_port
from marid.runner.execute import JobSpec
from marid.runner.reporter import DbReporter, Lease
from marid.submit import Submission, submit
from marid.users import User
from tests.conftest import MakeToken, bearer

MANIFEST = "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands: [echo hi]\n"
OUTPUT = "/api/b/alice/1/jobs/s.1/output"


async def events(resp: ClientResponse) -> AsyncIterator[tuple[str, dict]]:
    """(event name, data) of an event stream as they arrive."""
    name = ""
    while line := (await resp.content.readline()).decode():
        if line.startswith("event: "):
            name = line.removeprefix("event: ").strip()
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))


async def test_a_live_reader_follows_a_job_over_the_cap_across_its_end(
    pool: asyncpg.Pool, config: Config, api: TestClient, token: MakeToken, alice: User
):
    async with pool.acquire() as conn, conn.transaction():
        await submit(conn, Submission(alice, alice, None, manifest.parse(MANIFEST)))
    async with pool.acquire() as conn:
        claim = await lifecycle.claim(conn, "runner-1", ["os"], 30.0)
    assert claim is not None
    blobs = open_store(config.storage)
    reporter = DbReporter(pool, blobs, claim, "https://ci.example.com/api", Lease(30.0), 64 * 1024)
    jobs = [
        JobSpec(r["name"], "", id=r["id"]) for r in await pool.fetch("SELECT * FROM build_jobs")
    ]
    [setup] = [job for job in jobs if job.name != "s.1"]
    [job] = [job for job in jobs if job.name == "s.1"]
    await reporter.job_started(setup)
    await reporter.job_finished(setup, "passed", ran=True)
    await reporter.job_started(job)
    printed = "".join(f"line {n:06d} ü\n" for n in range(20000)).encode()  # 320 KB
    for start in range(0, len(printed), 10000):
        await reporter.job_output(job, printed[start : start + 10000].decode())
    await reporter.flush()

    value = await token("build:read")
    resp = await api.get(OUTPUT, headers={**bearer(value), "Accept": "text/event-stream"})
    seen, last_id = [], 0
    async for name, data in events(resp):
        assert name == "output"
        text = data["text"].encode()
        # While the job runs, offsets count printed bytes; past the head there is a gap.
        assert printed[data["offset"] : data["offset"] + len(text)] == text
        assert data["offset"] >= last_id
        seen.append(data["offset"] > last_id)
        last_id = data["offset"] + len(text)
        if last_id == len(printed):
            break
    assert seen.count(True) == 1  # one gap: the dropped middle

    await reporter.job_finished(job, "passed", ran=True)
    await reporter.build_finished("passed")
    after = [event async for event in events(resp)]  # caught up: nothing twice, then the end
    assert [name for name, _ in after] == ["status"]

    stored = await (await api.get(OUTPUT, headers=bearer(value))).text()
    assert "of output dropped here" in stored and len(stored.encode()) <= 64 * 1024
    replay = await api.get(OUTPUT, headers={**bearer(value), "Accept": "text/event-stream"})
    texts = [data["text"] async for name, data in events(replay) if name == "output"]
    assert "".join(texts) == stored
    await blobs.close()


@pytest.fixture
async def before_0014(pg_cluster: Cluster, tmp_path: Path) -> AsyncIterator[str]:
    """A database migrated up to 0013 (the DSN)."""
    admin = await asyncpg.connect(pg_cluster.dsn())
    await admin.execute("DROP DATABASE IF EXISTS output_migration WITH (FORCE)")
    await admin.execute("CREATE DATABASE output_migration")
    older = tmp_path / "migrations"
    older.mkdir()
    for path in db.migration_files():
        if path.name < "0014":
            shutil.copy(path, older / path.name)
    conn = await asyncpg.connect(pg_cluster.dsn("output_migration"))
    await db.migrate(conn, older)
    await conn.close()
    yield pg_cluster.dsn("output_migration")
    await admin.execute("DROP DATABASE IF EXISTS output_migration WITH (FORCE)")
    await admin.close()


async def test_migration_0014_moves_large_old_outputs_out_of_their_rows(
    before_0014: str,
    tmp_path: Path,
    aiohttp_client: Callable[..., Awaitable[TestClient]],
):
    big = "".join(f"old line {n:06d} — ü\n" for n in range(150000))  # 3.6 MB, multi-byte
    conn = await asyncpg.connect(before_0014)
    owner = await users.create(conn, "alice", "alice@example.com", "password1")
    async with conn.transaction():
        build = await submit(conn, Submission(owner, owner, None, manifest.parse(MANIFEST)))
    await conn.execute(
        "UPDATE build_jobs SET status = 'passed', started_at = now(), finished_at = now(),"
        " output = CASE WHEN name = 's.1' THEN $2 ELSE 'small\n' END WHERE build_id = $1",
        build.id,
        big,
    )
    await conn.execute(
        "UPDATE builds SET status = 'passed', started_at = now(), finished_at = now(),"
        " attempt = 1, output = 'small\n' || $2 WHERE id = $1",
        build.id,
        big,
    )
    await db.migrate(conn)
    # Made by today's code, once every later migration (0015: tokens.via_app_id) is in too.
    _, value = await tokens.create(conn, owner, "t", scopes.parse("build:read"))
    assert await conn.fetchval("SELECT output FROM builds") is None
    rows = await conn.fetch("SELECT name, output, output_size FROM build_jobs ORDER BY name")
    assert [tuple(r) for r in rows] == [
        ("create-driver", "small\n", 6),
        ("s.1", None, len(big.encode())),
    ]
    assert await conn.fetchval("SELECT max(octet_length(text)) FROM build_job_output") <= 65536
    await conn.close()

    cfg = config_module.from_dict(
        {
            "server": {"url": "https://ci.example.com"},
            "database": {"dsn": before_0014},
            "crypto": {"key": "test-crypto-key-" + "0" * 32},
            "storage": {"backend": "fs", "path": str(tmp_path / "blobs")},
            "rate_limit": {"enabled": False},
        }
    )
    pool = await db.create_pool(before_0014, size=2)
    try:
        api = await aiohttp_client(create_app(cfg, pool))
        raw = await api.get(OUTPUT, headers=bearer(value))
        assert await raw.text() == big
        assert raw.headers["Content-Length"] == str(len(big.encode()))
        entity = await (await api.get("/api/b/alice/1", headers=bearer(value))).json()
        line, _, tail = entity["output"].removeprefix("small\n").partition("\n")
        assert line.startswith("[marid: ") and line.endswith("/api/b/alice/1/jobs/s.1/output]")
        assert big.endswith(tail) and 1024**2 - 3 <= len(tail.encode()) <= 1024**2
    finally:
        await pool.close()


def serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`marid serve` in a child process, its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "marid", "--config", str(config), "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def rss(pid: int) -> int:
    """Resident memory of the process `pid`, in bytes (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_server_reading_a_large_output_four_times_at_once_stays_small(
    pool: asyncpg.Pool, config: Config, token: MakeToken, alice: User, tmp_path: Path
):
    """Memory, bounded generously (the bench measures it: bench/README.md): 4 readers of a
    40 MB output, raw and embedded, would have cost the old server over 300 MB."""
    async with pool.acquire() as conn, conn.transaction():
        await submit(conn, Submission(alice, alice, None, manifest.parse(MANIFEST)))
    async with pool.acquire() as conn:
        claim = await lifecycle.claim(conn, "runner-1", ["os"], 30.0)
    assert claim is not None
    blobs = open_store(config.storage)
    reporter = DbReporter(pool, blobs, claim, "https://ci.example.com/api", Lease(30.0))
    piece = "".join(f"{n:09d} {'.' * 89}\n" for n in range(640))  # 64,000 bytes
    for spec in [
        JobSpec(r["name"], "", id=r["id"]) for r in await pool.fetch("SELECT * FROM build_jobs")
    ]:
        await reporter.job_started(spec)
        if spec.name == "s.1":
            for _ in range(625):  # 40 MB
                await reporter.job_output(spec, piece)
        await reporter.job_finished(spec, "passed", ran=True)
    await reporter.build_finished("passed")
    await blobs.close()

    port = free_port()
    settings = {
        "server": {"url": f"http://127.0.0.1:{port}", "listen": f"127.0.0.1:{port}"},
        "database": {"dsn": config.database.dsn, "pool_size": 8},
        "crypto": {"key": config.crypto.key},
        "storage": {"backend": "fs", "path": config.storage.path},
        "rate_limit": {"enabled": False},
        "logging": {"level": "warning"},
    }
    (tmp_path / "marid.yml").write_text(yaml.safe_dump(settings))
    log = tmp_path / "serve.log"
    server = serve(tmp_path / "marid.yml", log)
    try:
        base, auth = f"http://127.0.0.1:{port}/api", bearer(await token("build:read"))
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(60):
                while True:
                    assert server.poll() is None, log.read_text()
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"{base}/b/alice/1", headers=auth) as resp:
                            if resp.status == 200:
                                break
                    await asyncio.sleep(0.1)
            before = peak = rss(server.pid)

            async def read(path: str) -> int:
                nonlocal peak
                size = 0
                async with session.get(base + path, headers=auth) as resp:
                    assert resp.status == 200
                    async for chunk in resp.content.iter_chunked(256 * 1024):
                        size += len(chunk)
                        peak = max(peak, rss(server.pid))
                return size

            paths = ["/b/alice/1/jobs/s.1/output", "/b/alice/1/jobs"] * 4
            sizes = await asyncio.gather(*(read(path) for path in paths))
        assert sizes[0] == 40_000_000 and sizes[1] < 4_000_000
        assert peak - before < 100 * 1024**2, (before, peak)
    finally:
        server.terminate()
        server.wait(timeout=30)
