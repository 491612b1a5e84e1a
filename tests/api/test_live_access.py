"""Live output and access (issue 11 row 13, docs/api.md §19): a stream ends once its reader
may no longer read the job, and it wakes on NOTIFY only, never by polling the database."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from marid import lifecycle, manifest, namespaces
from marid.blobs import BlobStore
from marid.config import Config
from marid.lifecycle import Claim
from marid.runner.execute import JobSpec
from marid.runner.reporter import DbReporter, Lease
from marid.submit import Submission, submit
from marid.users import User
from tests.api.helpers import add_collaborator, create_namespace
from tests.conftest import MakeToken, MakeUser, bearer

MANIFEST = "driver: {type: os}\nnamespace: open\nstages: [s]\njobs:\n- stage: s\n  commands: [x]\n"
OUTPUT = "/api/b/alice/1/jobs/s.1/output"
GUARD = 30.0  # seconds: a stream that never ends fails the test instead of hanging it


@dataclass
class Running:
    reporter: DbReporter
    job: JobSpec
    claim: Claim


@pytest.fixture
async def running(
    api: TestClient, pool: asyncpg.Pool, blobs: BlobStore, alice: User, token: MakeToken
) -> Running:
    """alice's build in her public namespace `open`, its job `s.1` running with one line."""
    await create_namespace(api, await token("namespace:write"), "open", visibility="public")
    async with pool.acquire() as conn, conn.transaction():
        ns = await namespaces.get_by_path(conn, alice.username, "open")
        assert ns is not None
        await submit(conn, Submission(alice, alice, ns, manifest.parse(MANIFEST)))
    async with pool.acquire() as conn:
        claim = await lifecycle.claim(conn, "runner-1", ["os"], 30.0)
    assert claim is not None
    reporter = DbReporter(pool, blobs, claim, "https://ci.example.com/api", Lease(30.0))
    rows = await pool.fetch("SELECT id, name FROM build_jobs ORDER BY position")
    specs = {row["name"]: JobSpec(row["name"], "", id=row["id"]) for row in rows}
    await reporter.job_started(specs["create-driver"])
    await reporter.job_finished(specs["create-driver"], "passed", ran=True)
    job = specs["s.1"]
    await reporter.job_started(job)
    await reporter.job_output(job, "first line\n")
    await reporter.flush()
    return Running(reporter, job, claim)


async def open_stream(api: TestClient, token: str | None) -> ClientResponse:
    headers = {**(bearer(token) if token else {}), "Accept": "text/event-stream"}
    resp = await api.get(OUTPUT, headers=headers)
    assert resp.status == 200, await resp.text()
    return resp


async def events(resp: ClientResponse) -> AsyncIterator[tuple[str, dict[str, object]]]:
    kind = ""
    async with asyncio.timeout(GUARD):
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                yield kind, json.loads(line.removeprefix("data: "))


async def rest(resp: ClientResponse) -> list[tuple[str, dict[str, object]]]:
    return [event async for event in events(resp)]


async def first_output(resp: ClientResponse) -> None:
    async for kind, data in events(resp):
        assert (kind, data["text"]) == ("output", "first line\n")
        return


async def test_a_stream_ends_when_its_namespace_turns_private(
    api: TestClient, running: Running, token: MakeToken
) -> None:
    resp = await open_stream(api, None)  # anonymous: the namespace is public
    await first_output(resp)
    patched = await api.patch(
        "/api/n/alice/open", headers=bearer(await token("namespace:write")),
        json={"visibility": "private"},
    )  # fmt: skip
    assert patched.status == 200, await patched.text()
    assert await rest(resp) == []  # ended, with no more output and no status
    assert (await api.get(OUTPUT)).status == 404


async def test_a_stream_ends_when_its_token_is_revoked_or_its_reader_removed(
    api: TestClient, running: Running, token: MakeToken, make_user: MakeUser, pool: asyncpg.Pool
) -> None:
    owner = await token("namespace:read,write,delete invite:read,write")
    patched = await api.patch(
        "/api/n/alice/open", headers=bearer(owner), json={"visibility": "private"}
    )
    assert patched.status == 200
    bob = await make_user("bob")
    bobs = await token("build:read", user=bob)
    invitee = await token("invite:write", user=bob)
    await add_collaborator(api, owner, "open", "alice", invitee, "bob")
    revoked, removed = await token("build:read"), await open_stream(api, bobs)
    by_token = await open_stream(api, revoked)
    await first_output(by_token)
    await first_output(removed)
    await pool.execute("DELETE FROM tokens WHERE digest = encode(sha256($1::bytea), 'hex')",
                       revoked.encode())  # fmt: skip
    assert await rest(by_token) == []
    await running.reporter.job_output(running.job, "bob still reads this\n")
    await running.reporter.flush()
    async for kind, data in events(removed):
        assert (kind, data["text"]) == ("output", "bob still reads this\n")
        break
    resp = await api.delete("/api/n/alice/open/-/collaborators/bob", headers=bearer(owner))
    assert resp.status == 204
    assert await rest(removed) == []


async def test_a_killed_job_ends_its_stream_through_notify(
    api: TestClient, running: Running, pool: asyncpg.Pool
) -> None:
    """A running build whose runner vanished after a kill ends `killed` without new output
    (lifecycle.finish_killed): its readers are told at once, not at the next poll."""
    resp = await open_stream(api, None)
    await first_output(resp)
    async with pool.acquire() as conn, conn.transaction():
        await lifecycle.finish_killed(conn, running.claim.build_id)
    assert await rest(resp) == [("status", {"status": "killed", "finished_at": ANY_TIME})]


class _AnyTime:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.endswith("Z")


ANY_TIME = _AnyTime()


async def test_an_idle_stream_does_not_poll_the_database(
    api: TestClient, running: Running, config: Config
) -> None:
    """While nothing happens, a stream sends no query (it polled every second before): no
    connection of the server starts a query in 3 s; then a line written wakes it at once."""
    resp = await open_stream(api, None)
    await first_output(resp)
    watcher = await asyncpg.connect(config.database.dsn)
    try:
        before = await query_starts(watcher)
        await asyncio.sleep(3)
        after = await query_starts(watcher)
    finally:
        await watcher.close()
    assert {pid: after[pid] for pid in before if pid in after} == before
    await running.reporter.job_output(running.job, "second\n")
    await running.reporter.flush()
    async for kind, data in events(resp):
        assert (kind, data["text"]) == ("output", "second\n")
        break
    resp.close()


async def query_starts(conn: asyncpg.Connection) -> dict[int, object]:
    """When each other connection to this database last started a query."""
    rows = await conn.fetch(
        "SELECT pid, query_start FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND backend_type = 'client backend'"
    )
    return {row["pid"]: row["query_start"] for row in rows}
