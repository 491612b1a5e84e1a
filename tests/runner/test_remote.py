"""The runner protocol end to end in one process (issue 15): the real API on a real port, and a
runner that reaches it over HTTP only (runner/remote.py), with a configuration that names no
database and no crypto key. The processes, kill -9 and a database that refuses the runners are
tests/faults/test_remote_runners.py's."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from marid import config as config_module
from marid import remote
from marid.api.app import create_app
from marid.config import Config
from marid.runner.backend import RunnerRevoked
from marid.runner.remote import HttpBackend
from marid.runner.worker import Worker
from tests.conftest import MakeToken, bearer
from tests.fixtures.s3 import s3_settings
from tests.runner.test_worker import THREE_STAGES

SCOPE = "build:read,write,delete variable:write object:write namespace:read,write"


@pytest.fixture
def server_config(config: Config) -> Config:
    return dataclasses.replace(
        config,
        drivers=["os"],
        runner=dataclasses.replace(config.runner, lease=3.0, max_attempts=3, retry_delay=0.1),
    )


@pytest.fixture
async def server(server_config: Config, pool: asyncpg.Pool) -> AsyncIterator[TestServer]:
    running = TestServer(create_app(server_config, pool), host="127.0.0.1")
    await running.start_server()
    yield running
    await running.close()


@pytest.fixture
def runner_config(server_config: Config) -> Config:
    """What a build host has: no database, no crypto key (nor their defaults' values)."""
    return dataclasses.replace(
        server_config,
        database=dataclasses.replace(server_config.database, dsn=""),
        crypto=dataclasses.replace(server_config.crypto, key=""),
        runner=dataclasses.replace(server_config.runner, parallelism=2, labels=["linux"]),
    )


@pytest.fixture
async def enrolment(pool: asyncpg.Pool) -> str:
    async with pool.acquire() as conn:
        _, value = await remote.create_enrolment(conn, "test", None, None)
    return value


class Remote:
    """A remote runner in the background, and the API's URL."""

    def __init__(self, server: TestServer, config: Config, token: str) -> None:
        self.url = str(server.make_url("/api"))
        self.worker = Worker(config, backend=HttpBackend(config, self.url, token))
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.worker.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 60)


@pytest.fixture
async def runner(
    server: TestServer, runner_config: Config, enrolment: str
) -> AsyncIterator[Remote]:
    running = Remote(server, runner_config, enrolment)
    yield running
    await running.close()


async def call(server: TestServer, method: str, path: str, token: str, **kwargs: Any) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, str(server.make_url("/api" + path)), headers=bearer(token), **kwargs
        ) as resp,
    ):
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body


async def until_final(server: TestServer, token: str, number: int) -> dict[str, Any]:
    for _ in range(600):
        status, body = await call(server, "GET", f"/b/alice/{number}", token)
        assert status == 200
        if body["status"] not in ("queued", "running"):
            return dict(body)
        await asyncio.sleep(0.05)
    raise AssertionError(f"build {number} did not end: {body}")


async def test_the_three_stage_build_runs_through_a_remote_runner(
    server: TestServer, runner: Remote, token: MakeToken, pool: asyncpg.Pool
) -> None:
    value = await token(SCOPE)
    status, _ = await call(
        server,
        "POST",
        "/variables",
        value,
        json={"key": "SECRET", "value": "hunter2-secret", "mask": True},
    )
    assert status == 201
    status, _ = await call(
        server, "POST", "/objects?name=data.txt", value, data=b"object content\n"
    )
    assert status == 201
    status, build = await call(server, "POST", "/builds", value, json={"manifest": THREE_STAGES})
    assert status == 201
    build = await until_final(server, value, build["number"])
    assert build["status"] == "passed_with_failures", build["output"]
    _, jobs = await call(server, "GET", f"/b/alice/{build['number']}/jobs", value)
    assert [j["status"] for j in jobs] == ["passed", "passed_with_failures", "passed", "passed"]
    assert "secret is xxxxxx" in jobs[2]["output"] and "hunter2" not in build["output"]
    assert "object content" in jobs[2]["output"]
    _, artifacts = await call(server, "GET", f"/b/alice/{build['number']}/artifacts", value)
    assert [(a["name"], a["size"]) for a in artifacts] == [("dist/app.bin", 300000)]
    async with aiohttp.ClientSession() as session:
        url = server.make_url(f"/api/b/alice/{build['number']}/artifacts/dist/app.bin")
        headers = {**bearer(value), "Accept": "application/octet-stream"}
        async with session.get(url, headers=headers) as raw:
            content = await raw.read()
    assert hashlib.sha256(content).hexdigest() == artifacts[0]["sha256"]
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT runner, job_token_digest FROM builds WHERE id = $1", build["id"]
        )
        listed = await remote.list_runners(conn)
    assert row["runner"] == runner.worker.name
    assert [(r.name, r.remote, r.labels, r.alive) for r in listed] == [
        (runner.worker.name, True, ["linux"], True)
    ]


async def test_a_kill_reaches_the_remote_runner(
    server: TestServer, runner: Remote, token: MakeToken
) -> None:
    value = await token(SCOPE)
    manifest = (
        "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n"
        "  commands: ['echo up', 'sleep 3600']\n"
    )
    _, build = await call(server, "POST", "/builds", value, json={"manifest": manifest})
    number = build["number"]
    for _ in range(400):
        status, job = await call(server, "GET", f"/b/alice/{number}/jobs/s.1", value)
        if job["status"] == "running":
            break
        await asyncio.sleep(0.05)
    status, _ = await call(server, "DELETE", f"/b/alice/{number}", value)
    assert status == 204
    build = await until_final(server, value, number)  # 30 s at most, not an hour
    assert build["status"] == "killed"
    _, job = await call(server, "GET", f"/b/alice/{number}/jobs/s.1", value)
    assert job["status"] == "killed" and "killed on request" in job["output"]


async def test_a_job_token_is_good_for_its_attempt_alone(
    server: TestServer,
    server_config: Config,
    token: MakeToken,
    pool: asyncpg.Pool,
    enrolment: str,
) -> None:
    """Replayed after its attempt ended, or used for another build, a job token gets 404 and
    changes nothing."""
    value = await token(SCOPE)
    manifest = "driver:\n  type: os\njobs:\n- commands:\n  - echo hi\n"
    numbers = []
    for _ in range(2):
        _, build = await call(server, "POST", "/builds", value, json={"manifest": manifest})
        numbers.append(build)
    said = {"name": "probe", "drivers": ["os"], "parallelism": 1}
    status, registered = await call(server, "POST", "/runner/register", enrolment, json=said)
    assert status == 201
    runner_token = registered["token"]
    claims = []
    for _ in range(2):
        status, claimed = await call(
            server, "POST", "/runner/claim", runner_token, json={"wait": 0}
        )
        assert status == 200
        claims.append(claimed)
    first, second = claims
    one, other = first["plan"]["build_id"], second["plan"]["build_id"]
    job = first["plan"]["stages"][0]["jobs"][0]["id"]
    # Another build's token: refused, and the first build's job is untouched.
    start = {"events": [{"type": "start", "job": job}]}
    status, _ = await call(
        server, "POST", f"/runner/builds/{one}/events", second["job_token"], json=start
    )
    assert status == 404
    status, _ = await call(server, "POST", f"/runner/builds/{other}/renew", first["job_token"])
    assert status == 404
    # The attempt ends (handed back for a new attempt); its token is dead from then on.
    status, _ = await call(
        server, "POST", f"/runner/builds/{one}/fail", first["job_token"], json={"reason": "test"}
    )
    assert status == 204
    async with pool.acquire() as conn:
        before = await conn.fetchrow("SELECT * FROM builds WHERE id = $1", one)
        jobs_before = await conn.fetch("SELECT * FROM build_jobs WHERE build_id = $1", one)
    for method, path, body in [
        ("POST", f"/runner/builds/{one}/renew", {}),
        ("POST", f"/runner/builds/{one}/events", start),
        (
            "POST",
            f"/runner/builds/{one}/events",
            {
                "events": [
                    {"type": "start", "job": job},
                    {"type": "output", "job": job, "chunks": [[0, "late\n"]]},
                    {"type": "finish", "job": job, "status": "passed", "ran": True},
                    {"type": "end", "status": "passed"},
                ]
            },
        ),
        ("POST", f"/runner/builds/{one}/fail", {"reason": "again"}),
    ]:
        status, _ = await call(server, method, path, first["job_token"], json=body)
        assert status == 404, path
    async with pool.acquire() as conn:
        after = await conn.fetchrow("SELECT * FROM builds WHERE id = $1", one)
        jobs_after = await conn.fetch("SELECT * FROM build_jobs WHERE build_id = $1", one)
        chunks = await conn.fetchval(
            "SELECT count(*) FROM build_job_output o JOIN build_jobs j ON j.id = o.job_id"
            " WHERE j.build_id = $1",
            one,
        )
    assert dict(after) == dict(before) and after["status"] == "queued"
    assert [dict(j) for j in jobs_after] == [dict(j) for j in jobs_before]
    assert chunks == 0
    # The second build's own token still works.
    status, body = await call(
        server, "POST", f"/runner/builds/{other}/renew", second["job_token"], json={"lease": 5}
    )
    assert (status, body) == (200, {"kill": False})


class Cuttable:
    """A TCP proxy to the API that a test can cut (connections dropped, new ones refused)
    and mend on the same port: a runner behind it loses the server for a while."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()

    async def close(self) -> None:
        await self.cut()


async def test_a_runner_cut_off_stops_its_job_before_another_takes_the_build(
    server: TestServer,
    runner_config: Config,
    enrolment: str,
    token: MakeToken,
    pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    """Lease rules over HTTP (issue 15 item 4): a runner that cannot reach the API stops its job
    before its lease runs out, so the runner that recovers the build never runs it alongside;
    back, the first runner's late reports get 404 and change nothing. The job holds a lock
    the whole time it runs: a second attempt starting while the first still ran would fail."""
    value = await token(SCOPE)
    lock, pids = tmp_path / "lock", tmp_path / "pids"
    manifest = (
        "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands:\n"
        f"  - exec 9>{lock}\n"
        "  - flock -n 9 || { echo the previous attempt still runs; exit 1; }\n"
        f"  - echo $$ >> {pids}\n"
        "  - sleep 4\n"
        "  - echo done\n"
    )
    proxy = Cuttable(server.port or 0)
    await proxy.start()
    cut_off = dataclasses.replace(
        runner_config, runner=dataclasses.replace(runner_config.runner, name="cut-off")
    )
    behind = Worker(
        cut_off, backend=HttpBackend(cut_off, f"http://127.0.0.1:{proxy.port}/api", enrolment)
    )
    stop_behind = asyncio.Event()
    running = asyncio.create_task(behind.run(stop_behind))
    other: Remote | None = None
    try:
        _, build = await call(server, "POST", "/builds", value, json={"manifest": manifest})
        for _ in range(400):
            if pids.exists() and pids.read_text().strip():
                break
            await asyncio.sleep(0.05)
        first = int(pids.read_text().split()[0])
        await proxy.cut()  # the runner is cut off mid-job
        taker = dataclasses.replace(
            runner_config, runner=dataclasses.replace(runner_config.runner, name="taker")
        )
        other = Remote(server, taker, enrolment)
        for _ in range(600):
            if len(pids.read_text().split()) > 1:
                break
            await asyncio.sleep(0.05)
        assert len(pids.read_text().split()) == 2, "the build was never taken again"
        assert not Path(f"/proc/{first}").exists(), "attempt 1 still runs beside attempt 2"
        done = await until_final(server, value, build["number"])
        assert done["status"] == "passed", done["output"]
        assert "still runs" not in done["output"]
        assert "attempt 2 (attempt 1: runner lost its lease" in done["output"]
        await proxy.start()  # back: its late writes are refused
        stop_behind.set()
        await asyncio.wait_for(running, 60)
        async with pool.acquire() as conn:
            final = await conn.fetchrow(
                "SELECT status, attempt, runner FROM builds WHERE id = $1", build["id"]
            )
        assert (final["status"], final["attempt"]) == ("passed", 2)
        assert final["runner"] == other.worker.name != behind.name
    finally:
        stop_behind.set()
        if not running.done():
            running.cancel()
        await proxy.close()
        if other is not None:
            await other.close()


async def test_a_revoked_runner_stops_within_a_heartbeat_and_its_build_is_requeued(
    server: TestServer,
    runner_config: Config,
    enrolment: str,
    token: MakeToken,
    pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    value = await token(SCOPE)
    pids = tmp_path / "pids"
    manifest = (
        "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands:\n"
        f"  - echo $$ >> {pids}\n  - sleep 600\n"
    )
    running = Remote(server, runner_config, enrolment)
    try:
        _, build = await call(server, "POST", "/builds", value, json={"manifest": manifest})
        for _ in range(400):
            if pids.exists() and pids.read_text().strip():
                break
            await asyncio.sleep(0.05)
        job = int(pids.read_text().split()[0])
        async with pool.acquire() as conn, conn.transaction():
            runner_id = await conn.fetchval(
                "SELECT id FROM runners WHERE name = $1", running.worker.name
            )
            handed = await remote.revoke(conn, runner_id, 3)
        assert handed is not None and handed.builds == [build["id"]]
        # Its job stops at the next renewal (every second), and the runner ends.
        with pytest.raises(RunnerRevoked):
            await asyncio.wait_for(running.task, 30)
        assert not Path(f"/proc/{job}").exists()
        async with pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT status, retry_reason FROM builds WHERE id = $1", build["id"]
            )
            alive = await conn.fetchval(
                "SELECT runner_alive(r) FROM runners r WHERE id = $1", runner_id
            )
        assert (row["status"], row["retry_reason"]) == ("queued", "attempt 1: runner revoked")
        assert alive is False
        # Its token is refused from now on, saying why.
        said = {"name": "x", "drivers": ["os"], "parallelism": 1}
        status, body = await call(
            server, "POST", "/runner/heartbeat", running.worker.backend.token, json=said
        )
        assert (status, body["revoked"]) == (401, True)
    finally:
        running.stop.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(running.task, 30)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/runner/register", {"drivers": ["os"], "parallelism": 1}, "name"),
        ("/runner/register", {"name": "r", "drivers": ["os"], "parallelism": 0}, "parallelism"),
        ("/runner/register", {"name": "r", "drivers": ["vm"], "parallelism": 1}, "drivers"),
        ("/runner/register", {"name": "r/../x", "drivers": [], "parallelism": 1}, "name"),
        ("/runner/register", {"name": "r", "drivers": [], "parallelism": 1, "x": 1}, "x"),
        ("/runner/register", {"name": "r", "drivers": "os", "parallelism": 1}, "drivers"),
        (
            "/runner/register",
            {"name": "r", "drivers": [], "parallelism": 1, "labels": ["a b"]},
            "labels",
        ),
    ],
)
async def test_a_bad_registration_gets_a_field_keyed_400(
    server: TestServer, enrolment: str, path: str, body: dict[str, Any], field: str
) -> None:
    status, answer = await call(server, "POST", path, enrolment, json=body)
    assert status == 400 and field in answer, answer


async def test_bad_tokens_and_bodies_are_refused(
    server: TestServer, enrolment: str, token: MakeToken, pool: asyncpg.Pool
) -> None:
    said = {"name": "probe", "drivers": ["os"], "parallelism": 1}
    for wrong in ("", "mre_nope", "mrr_nope", await token(SCOPE)):
        status, answer = await call(server, "POST", "/runner/register", wrong, json=said)
        assert status == 401 and answer["revoked"] is False
    status, registered = await call(server, "POST", "/runner/register", enrolment, json=said)
    assert status == 201
    runner_token = registered["token"]
    for wrong in ("", enrolment, "mrr_nope"):
        status, _ = await call(server, "POST", "/runner/claim", wrong, json={"wait": 0})
        assert status == 401
    for body, field in [
        ({"wait": 61}, "wait"),
        ({"wait": "soon"}, "wait"),
        ({"lease": 0}, "lease"),
        ({"wait": 0, "queue": "all"}, "queue"),
    ]:
        status, answer = await call(server, "POST", "/runner/claim", runner_token, json=body)
        assert status == 400 and field in answer, answer
    status, answer = await call(server, "POST", "/runner/claim", runner_token, data=b"{not json")
    assert status == 400
    # A claimed build's job token: malformed reports are refused and change nothing.
    value = await token(SCOPE)
    _, build = await call(
        server, "POST", "/builds", value, json={"manifest": "driver: {type: os}\n"}
    )
    status, claimed = await call(server, "POST", "/runner/claim", runner_token, json={"wait": 0})
    assert status == 200
    job_token = claimed["job_token"]
    job = claimed["plan"]["stages"][0]["jobs"][0]["id"]
    base = f"/runner/builds/{build['id']}"

    def events(*given: dict[str, Any]) -> dict[str, Any]:
        # A good event first: a refused request applies none of its events.
        return {"events": [{"type": "start", "job": job}, *given]}

    for path, body, field, text in [
        (
            f"{base}/events",
            events({"type": "output", "job": job, "chunks": [["0", "x"]]}),
            "events",
            "event 1: chunks",
        ),
        (
            f"{base}/events",
            events({"type": "output", "job": job, "chunks": [], "forget": [1]}),
            "events",
            "event 1: forget",
        ),
        (
            f"{base}/events",
            events({"type": "finish", "job": job, "status": "great", "ran": True}),
            "events",
            "event 1: status",
        ),
        (
            f"{base}/events",
            events(
                {
                    "type": "finish",
                    "job": job,
                    "status": "passed",
                    "ran": True,
                    "written": {"printed": 1, "head": 5},
                }
            ),
            "events",
            "event 1: written",
        ),
        (
            f"{base}/events",
            events({"type": "end", "status": "passed", "kept": {"place": "x"}}),
            "events",
            "event 1: kept",
        ),
        (
            f"{base}/events",
            events({"type": "end", "status": "passed"}, {"type": "start", "job": job}),
            "events",
            "must be the last",
        ),
        (f"{base}/events", events({"type": "key", "name": "k"}), "events", "event 1: location"),
        (f"{base}/events", events({"type": "reboot"}), "events", "event 1: type"),
        (
            f"{base}/events",
            events({"type": "start", "job": job, "when": 1}),
            "events",
            "event 1: when: Unknown field",
        ),
        (f"{base}/events", {"events": []}, "events", "1 to 1000"),
        (f"{base}/fail", {"reason": ""}, "reason", "Reason"),
    ]:
        status, answer = await call(server, "POST", path, job_token, json=body)
        assert status == 400 and field in answer, (path, answer)
        assert any(text in message for message in answer[field]), answer
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT status FROM builds WHERE id = $1", build["id"])
        jobs = await conn.fetch(
            "SELECT status, output FROM build_jobs WHERE build_id = $1", build["id"]
        )
    assert row["status"] == "running"
    assert [(j["status"], j["output"]) for j in jobs] == [("queued", None)]
    # An artifact the build does not declare, and path tricks in its name, are refused.
    async with aiohttp.ClientSession() as session:
        url = server.make_url(f"/api{base}/jobs/{job}/artifacts")
        params = {"source": "x", "name": "../../etc/passwd"}
        async with session.put(url, params=params, data=b"x", headers=bearer(job_token)) as resp:
            assert resp.status == 400


@pytest.mark.parametrize("backend", ["fs", "s3"])
async def test_objects_caches_and_artifacts_travel_through_the_api_or_presigned_urls(
    backend: str,
    request: pytest.FixtureRequest,
    server_config: Config,
    runner_config: Config,
    pool: asyncpg.Pool,
    enrolment: str,
    token: MakeToken,
    tmp_path: Path,
) -> None:
    """With an S3 blob store, downloads are redirected to presigned URLs that the runner
    fetches without its token; uploads stream through the API, as with fs."""
    if backend == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        storage = config_module.StorageConfig(
            backend="s3", s3=config_module.S3Config(**s3_settings(endpoint, bucket))
        )
    else:
        storage = config_module.StorageConfig(backend="fs", path=str(tmp_path / "blobs"))
    configured = dataclasses.replace(server_config, storage=storage)
    running_server = TestServer(create_app(configured, pool), host="127.0.0.1")
    await running_server.start_server()
    runner = Remote(running_server, runner_config, enrolment)
    value = await token(SCOPE)
    try:
        status, _ = await call(
            running_server, "POST", "/objects?name=data.txt", value, data=b"object content\n"
        )
        assert status == 201
        manifest = (
            "driver: {type: os}\nobjects: [data.txt => data.txt]\ncache: [deps]\n"
            "stages: [s]\njobs:\n- stage: s\n  commands:\n"
            "  - cat data.txt\n  - mkdir -p deps && cat data.txt > deps/copy\n"
            "  - head -c 100000 /dev/urandom > out.bin\n  - sha256sum out.bin\n"
            "  artifacts: [out.bin]\n"
        )
        numbers = []
        for _ in range(2):
            _, build = await call(
                running_server, "POST", "/builds", value, json={"manifest": manifest}
            )
            done = await until_final(running_server, value, build["number"])
            assert done["status"] == "passed", done["output"]
            numbers.append(done)
        first, second = numbers
        assert "object content" in first["output"]
        assert "cache default saved: 1 path" in first["output"]
        assert (
            f"cache default restored: 1 path, 10.0 KiB (saved by build #{first['number']})"
            in (second["output"])
        )
        _, artifacts = await call(
            running_server, "GET", f"/b/alice/{second['number']}/artifacts", value
        )
        assert f"{artifacts[0]['sha256']}  out.bin" in second["output"]
    except BaseException:
        await running_server.close()
        raise
    finally:
        await runner.close()
    # A claimed build's object: the content itself (fs), or a redirect to the bucket (s3).
    _, build = await call(running_server, "POST", "/builds", value, json={"manifest": manifest})
    said = {"name": "probe", "drivers": ["os"], "parallelism": 1}
    _, registered = await call(running_server, "POST", "/runner/register", enrolment, json=said)
    _, claimed = await call(
        running_server, "POST", "/runner/claim", registered["token"], json={"wait": 0}
    )
    object_id = claimed["plan"]["objects"][0]["id"]
    async with aiohttp.ClientSession() as session:
        url = running_server.make_url(f"/api/runner/builds/{build['id']}/objects/{object_id}")
        headers = bearer(claimed["job_token"])
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            if backend == "s3":
                assert resp.status == 307
                assert resp.headers["Location"].startswith(endpoint)
            else:
                assert (resp.status, await resp.read()) == (200, b"object content\n")
    await running_server.close()


async def test_a_job_s_times_are_when_it_ran_not_when_the_api_heard(
    server: TestServer, runner: Remote, token: MakeToken, pool: asyncpg.Pool
) -> None:
    """Events travel in batches: each says how long before its request it happened."""
    value = await token(SCOPE)
    manifest = "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands: [sleep 1]\n"
    _, build = await call(server, "POST", "/builds", value, json={"manifest": manifest})
    done = await until_final(server, value, build["number"])
    assert done["status"] == "passed"
    async with pool.acquire() as conn:
        seconds = await conn.fetchval(
            "SELECT extract(epoch FROM finished_at - started_at) FROM build_jobs"
            " WHERE build_id = $1 AND name = 's.1'",
            build["id"],
        )
    assert seconds >= 0.95  # the job's `sleep 1`, not the 0 s of one batch


async def test_events_of_any_shape_get_a_400_not_a_500(
    server: TestServer, enrolment: str, token: MakeToken
) -> None:
    """What the fuzzer found (tests/api/test_schemathesis.py): an event type that is no
    string."""
    for event in ({"type": {}}, {"type": []}, {"type": None}, [], "start", 7):
        status, answer = await call(
            server, "POST", "/runner/builds/1/events", "mrj_x", json={"events": [event]}
        )
        assert status == 400 and "events" in answer, (event, answer)


async def test_events_sent_again_after_a_lost_answer_change_nothing(
    server: TestServer, enrolment: str, token: MakeToken, pool: asyncpg.Pool
) -> None:
    """A batch applied whose answer was lost is sent again: its job stays ended."""
    value = await token(SCOPE)
    manifest = "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands: [echo hi]\n"
    _, build = await call(server, "POST", "/builds", value, json={"manifest": manifest})
    said = {"name": "probe", "drivers": ["os"], "parallelism": 1}
    _, registered = await call(server, "POST", "/runner/register", enrolment, json=said)
    _, claimed = await call(server, "POST", "/runner/claim", registered["token"], json={"wait": 0})
    job = claimed["plan"]["stages"][0]["jobs"][0]["id"]
    batch = {
        "events": [
            {"type": "start", "job": job, "ago": 0.5},
            {"type": "output", "job": job, "chunks": [[0, "hi\n"]]},
            {
                "type": "finish",
                "job": job,
                "status": "passed",
                "ran": True,
                "written": {"printed": 3},
                "ago": 0.2,
            },
        ]
    }
    path = f"/runner/builds/{build['id']}/events"
    for _ in range(2):
        status, _ = await call(server, "POST", path, claimed["job_token"], json=batch)
        assert status == 204
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT status, output, finished_at > started_at AS ordered FROM build_jobs"
            " WHERE id = $1",
            job,
        )
    assert (row["status"], row["output"], row["ordered"]) == ("passed", "hi\n", True)
