"""The queue end to end with the os driver: HTTP submission, a real worker, the API's view."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import lifecycle
from marid.api.app import create_app
from marid.blobs import open_store
from marid.config import Config
from marid.lifecycle import LostLease
from marid.runner.execute import JobSpec
from marid.runner.reporter import DbReporter, Lease
from marid.runner.worker import Worker
from tests.conftest import MakeToken, bearer
from tests.runner.conftest import background_worker

SCOPE = "build:read,write,delete variable:write object:write namespace:read,write"


@pytest.fixture
def os_config(config: Config) -> Config:
    return dataclasses.replace(
        config,
        drivers=["os"],
        runner=dataclasses.replace(config.runner, lease=2.0, parallelism=2),
    )


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], os_config: Config, pool: asyncpg.Pool
) -> TestClient:
    return await aiohttp_client(create_app(os_config, pool))


@pytest.fixture
async def worker(os_config: Config, pool: asyncpg.Pool) -> AsyncIterator[Worker]:
    """A runner working in the background for the test's duration."""
    async with background_worker(os_config, pool, stop_timeout=30) as running:
        yield running


async def submit(client: TestClient, token: str, manifest: str, **extra: object) -> dict:
    resp = await client.post(
        "/api/builds", headers=bearer(token), json={"manifest": manifest, **extra}
    )
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


async def wait_for(client: TestClient, token: str, url: str, done: Callable[[dict], bool]) -> dict:
    path = url.removeprefix("https://ci.example.com")
    for _ in range(400):
        body = await (await client.get(path, headers=bearer(token))).json()
        if done(body):
            return dict(body)
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting on {url}: {body}")


def finished(body: dict) -> bool:
    return body["status"] not in ("queued", "running")


THREE_STAGES = """\
driver:
  type: os
env:
- PLAIN=visible
objects:
- data.txt => conf/data.txt
stages:
- lint
- test
- package
allow_failures:
- lint
jobs:
- stage: lint
  commands:
  - echo linting
  - exit 1
- stage: test
  name: Unit Tests
  commands:
  - echo "secret is $SECRET"
  - cat conf/data.txt
- stage: package
  commands:
  - head -c 300000 /dev/urandom > app.bin
  - cp app.bin /tmp/../$HOME/copy.bin
  artifacts:
  - app.bin => dist/app.bin
"""


async def test_three_stage_build_runs_and_reports(
    client: TestClient, token: MakeToken, worker: Worker, tmp_path: Path
):
    value = await token(SCOPE)
    resp = await client.post(
        "/api/variables",
        headers=bearer(value),
        json={"key": "SECRET", "value": "hunter2-secret", "mask": True},
    )
    assert resp.status == 201
    resp = await client.post(
        "/api/objects?name=data.txt", headers=bearer(value), data=b"object content\n"
    )
    assert resp.status == 201, await resp.text()
    build = await submit(client, value, THREE_STAGES, comment="ci", tags=["a", "b"])
    assert build["status"] == "queued" and build["tags"] == ["a", "b"]
    build = await wait_for(client, value, build["url"], finished)
    assert build["status"] == "passed_with_failures", build["output"]
    assert build["started_at"] and build["finished_at"]

    jobs = await (
        await client.get(f"/api/b/alice/{build['number']}/jobs", headers=bearer(value))
    ).json()
    assert [(j["stage"], j["name"], j["status"]) for j in jobs] == [
        ("setup - #1", "create-driver", "passed"),
        ("lint", "lint.1", "passed_with_failures"),
        ("test", "unit-tests", "passed"),
        ("package", "package.1", "passed"),
    ]
    unit = jobs[2]["output"]
    assert "secret is xxxxxx" in unit and "hunter2" not in build["output"]
    assert "object content" in unit
    assert "Placing object data.txt => conf/data.txt" in jobs[0]["output"]
    assert build["output"] == "".join(j["output"] for j in jobs)

    base = f"/api/b/alice/{build['number']}"
    objects = await (await client.get(base + "/objects", headers=bearer(value))).json()
    assert [(o["source"], o["name"], o["placed"]) for o in objects] == [
        ("data.txt", "conf/data.txt", True)
    ]
    variables = await (await client.get(base + "/variables", headers=bearer(value))).json()
    assert [(v["key"], v["value"], v["masked"]) for v in variables] == [
        ("PLAIN", "visible", False),
        ("SECRET", "xxxxxx", True),
    ]

    artifacts = await (await client.get(base + "/artifacts", headers=bearer(value))).json()
    assert [(a["name"], a["size"], a["job"]["name"]) for a in artifacts] == [
        ("dist/app.bin", 300000, "package.1")
    ]
    raw = await client.get(
        base + "/artifacts/dist/app.bin",
        headers={**bearer(value), "Accept": "application/octet-stream"},
    )
    assert raw.status == 200
    content = await raw.read()
    assert len(content) == 300000
    assert hashlib.sha256(content).hexdigest() == artifacts[0]["sha256"]
    assert raw.headers["Content-Type"] == "application/octet-stream"


async def test_kill_ends_a_running_build(client: TestClient, token: MakeToken, worker: Worker):
    value = await token(SCOPE)
    manifest = (
        "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n"
        "  commands: ['echo up', 'sleep 3600']\n"
    )
    build = await submit(client, value, manifest)
    await wait_for(
        client, value, build["url"] + "/jobs/s.1", lambda job: job["status"] == "running"
    )
    resp = await client.delete(f"/api/b/alice/{build['number']}", headers=bearer(value))
    assert resp.status == 204
    killed = await wait_for(client, value, build["url"], finished)  # 20 s at most, not an hour
    assert killed["status"] == "killed"


async def test_killing_a_queued_build_means_it_never_runs(
    client: TestClient, token: MakeToken, pool: asyncpg.Pool
):
    value = await token(SCOPE)
    build = await submit(client, value, "driver: {type: os}\n")
    assert (
        await client.delete(f"/api/b/alice/{build['number']}", headers=bearer(value))
    ).status == 204
    body = await (await client.get(f"/api/b/alice/{build['number']}", headers=bearer(value))).json()
    assert (body["status"], body["started_at"]) == ("killed", None)
    jobs = await pool.fetch("SELECT status, started_at FROM build_jobs")
    assert [(r["status"], r["started_at"]) for r in jobs] == [("killed", None)]


async def test_dead_runner_is_recovered_and_its_late_writes_are_fenced(
    client: TestClient, token: MakeToken, pool: asyncpg.Pool, os_config: Config
):
    value = await token(SCOPE)
    build = await submit(
        client, value, "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands: [echo hi]\n"
    )
    async with pool.acquire() as conn:
        dead = await lifecycle.claim(conn, "dead-runner", ["os"], 0.2)
    assert dead is not None and dead.attempt == 1
    job_id = await pool.fetchval("SELECT id FROM build_jobs WHERE name = 's.1'")
    zombie = DbReporter(
        pool, open_store(os_config.storage), dead, os_config.server.api_url, Lease(0.2)
    )
    await zombie.job_output(JobSpec("s.1", "", id=job_id), "from the dead attempt\n")
    await zombie.flush()
    await asyncio.sleep(0.3)  # the lease runs out

    blobs = open_store(os_config.storage)
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(os_config, pool, blobs).run(stop))
    done = await wait_for(client, value, build["url"], finished)
    stop.set()
    await task
    assert done["status"] == "passed"
    assert "orphaned" in done["tags"]
    assert "dead attempt" not in done["output"]
    assert done["output"].startswith("marid: attempt 2 (attempt 1: runner lost its lease)\n")
    assert done["attempts"] == 2
    with pytest.raises(LostLease):
        await zombie.job_started(JobSpec("s.1", "", id=job_id))
    with pytest.raises(LostLease):
        await zombie.build_finished("failed")
    assert await pool.fetchval("SELECT attempt FROM builds") == 2
    assert await pool.fetchval("SELECT status FROM builds") == "passed"
    await blobs.close()


async def test_live_output_arrives_while_the_job_runs(
    client: TestClient, token: MakeToken, worker: Worker, tmp_path: Path
):
    value = await token(SCOPE)
    gate = tmp_path / "gate"  # the job waits for it after line 1; the test opens it on reading it
    manifest = (
        "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands:\n"
        f"  - echo line 1; until [ -e {gate} ]; do sleep 0.05; done; echo line 2\n"
    )
    build = await submit(client, value, manifest)
    url = f"/api/b/alice/{build['number']}/jobs/s.1/output"
    resp = await client.get(url, headers={**bearer(value), "Accept": "text/event-stream"})
    assert resp.headers["Content-Type"] == "text/event-stream"
    events, texts = [], []
    async with asyncio.timeout(60):  # line 1 can only come while the job runs: it waits for us
        lines = [raw async for raw in _opening_the_gate(resp.content, gate)]
    for raw in lines:
        line = raw.decode().rstrip("\n")
        if line.startswith("event:"):
            events.append(line.split(": ", 1)[1])
        elif line.startswith("data:"):
            data = json.loads(line.split(": ", 1)[1])
            if events[-1] == "output":
                texts.append(data["text"])
            else:
                assert data["status"] == "passed"
    assert events[-1] == "status"
    assert "".join(texts).startswith("+ echo line 1\nline 1\n")
    assert "".join(texts).endswith("+ echo line 2\nline 2\n")
    job = await (await client.get(url.removesuffix("/output"), headers=bearer(value))).json()
    assert "".join(texts) == job["output"]
    plain = await client.get(url, headers=bearer(value))
    assert await plain.text() == job["output"]
    assert plain.headers["X-Marid-Job-Status"] == "passed"
    assert plain.headers["X-Marid-Output-Length"] == str(len(job["output"].encode()))


async def _opening_the_gate(content: AsyncIterator[bytes], gate: Path) -> AsyncIterator[bytes]:
    """The event stream's lines; `gate` is created once a line holding `line 1` went by."""
    async for raw in content:
        if b"line 1" in raw and not gate.exists():
            gate.touch()
        yield raw


async def test_a_runner_runs_builds_in_parallel_up_to_its_limit(
    client: TestClient, token: MakeToken, worker: Worker, pool: asyncpg.Pool
):
    value = await token(SCOPE)
    manifest = "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands: [sleep 1]\n"
    builds = [await submit(client, value, manifest) for _ in range(3)]
    for build in builds:
        await wait_for(client, value, build["url"], finished)
    rows = await pool.fetch("SELECT started_at, finished_at FROM builds ORDER BY number")
    # parallelism 2: the first two overlap, the third starts only when one of them is done
    assert rows[1]["started_at"] < rows[0]["finished_at"]
    assert rows[2]["started_at"] >= min(rows[0]["finished_at"], rows[1]["finished_at"])


async def test_a_build_run_sends_submitted_started_and_finished_events(
    client: TestClient, token: MakeToken, worker: Worker, pool: asyncpg.Pool
):
    value = await token(SCOPE + " webhook:write")
    resp = await client.post("/api/namespaces", headers=bearer(value), json={"name": "team"})
    assert resp.status == 201
    resp = await client.post(
        "/api/n/alice/team/-/webhooks",
        headers=bearer(value),
        json={"payload_url": "https://hooks.example.org/ci"},
    )
    assert resp.status == 201, await resp.text()
    manifest = "driver: {type: os}\nnamespace: team\njobs: [{commands: [echo hi]}]\n"
    build = await submit(client, value, manifest)
    done = await wait_for(client, value, build["url"], finished)
    assert done["status"] == "passed"
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT event, body FROM webhook_deliveries ORDER BY id")
    events = [(row["event"], json.loads(row["body"])) for row in rows]
    assert [(event, body["status"]) for event, body in events] == [
        ("build.submitted", "queued"),
        ("build.started", "running"),
        ("build.finished", "passed"),
    ]
    assert events[1][1]["started_at"] is not None and events[1][1]["finished_at"] is None
    assert events[2][1] == done


async def test_a_finished_job_keeps_its_output_in_its_row_only(
    client: TestClient, token: MakeToken, worker: Worker, pool: asyncpg.Pool
):
    value = await token(SCOPE)
    manifest = "driver: {type: os}\nstages: [s]\njobs: [{stage: s, commands: ['seq 1 3000']}]\n"
    build = await submit(client, value, manifest)
    done = await wait_for(client, value, build["url"], finished)
    assert done["status"] == "passed"
    path = build["url"].removeprefix("https://ci.example.com") + "/jobs/s.1/output"
    resp = await client.get(path, headers=bearer(value))
    text = await resp.text()
    assert text.splitlines()[-3000:] == [str(n) for n in range(1, 3001)]
    assert resp.headers["X-Marid-Output-Length"] == str(len(text.encode()))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM build_job_output") == 0


async def test_the_runner_keeps_builds_max_output_of_a_job(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    os_config: Config,
    pool: asyncpg.Pool,
    token: MakeToken,
):
    """builds.max_output reaches the runner's writer (docs/configuration.md): 2 MB printed,
    64 KiB kept, the dropped middle said."""
    capped = dataclasses.replace(
        os_config, builds=dataclasses.replace(os_config.builds, max_output=64 * 1024)
    )
    client = await aiohttp_client(create_app(capped, pool))
    blobs = open_store(capped.storage)
    stop = asyncio.Event()
    running = asyncio.create_task(Worker(capped, pool, blobs).run(stop))
    try:
        value = await token(SCOPE)
        noisy = (
            "driver:\n  type: os\nstages:\n- make\njobs:\n- stage: make\n  name: noisy\n"
            "  commands:\n  - yes 0123456789 | head -c 2000000\n"
        )
        build = await submit(client, value, noisy)
        done = await wait_for(client, value, build["url"], finished)
        assert done["status"] == "passed"

        jobs = build["url"].removeprefix("https://ci.example.com") + "/jobs"
        listed = await (await client.get(jobs, headers=bearer(value))).json()
        [job] = [job for job in listed if job["name"] != "create-driver"]
        resp = await client.get(f"{jobs}/{job['name']}/output", headers=bearer(value))
        kept = await resp.text()
        assert resp.status == 200, kept
        assert "\n0123456789\n0123456789\n" in kept[:100]  # the head, after the traced commands
        assert "of output dropped here; the job printed 1.9 MiB]" in kept
        assert len(kept.encode()) <= 64 * 1024 + 200  # the cap, and the line saying so
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        await blobs.close()
