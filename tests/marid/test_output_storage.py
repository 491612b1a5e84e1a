"""Job output at any size (issue 10 part 6, docs/architecture.md §6.1): the runner's writer
(DbReporter) against a real PostgreSQL and a real fs blob store, read back through the API."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import lifecycle, manifest, output
from marid.blobs import BlobNotFound, BlobStore, new_key
from marid.lifecycle import Claim
from marid.reaper import Reaper
from marid.runner.execute import JobSpec
from marid.runner.reporter import DbReporter, Lease
from marid.submit import Submission, submit
from marid.users import User
from tests.conftest import MakeToken, bearer

MANIFEST = "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands: [echo hi]\n"
BUILD = "/api/b/alice/1"


@pytest.fixture
async def claim(pool: asyncpg.Pool, alice: User) -> Claim:
    async with pool.acquire() as conn, conn.transaction():
        await submit(conn, Submission(alice, alice, None, manifest.parse(MANIFEST)))
    async with pool.acquire() as conn:
        claimed = await lifecycle.claim(conn, "runner-1", ["os"], 30.0)
    assert claimed is not None
    return claimed


def lines(count: int, start: int = 0) -> list[str]:
    """Numbered lines with a two-byte character each, so cuts must respect characters."""
    return [f"line {n:07d} é {'x' * 40}\n" for n in range(start, start + count)]


async def run_job(
    pool: asyncpg.Pool,
    blobs: BlobStore,
    claim: Claim,
    texts: list[str],
    max_output: int = 64 * 1024**2,
    finish: bool = True,
) -> tuple[DbReporter, JobSpec]:
    """The build's one job prints `texts` through a runner's reporter; then the build ends
    `passed` (unless not `finish`)."""
    reporter = DbReporter(pool, blobs, claim, "https://ci.example.com/api", Lease(30.0))
    reporter.max_output = max_output
    rows = await pool.fetch("SELECT id, name FROM build_jobs ORDER BY position")
    specs = [JobSpec(row["name"], "", id=row["id"]) for row in rows]
    job = next(spec for spec in specs if spec.name == "s.1")
    for spec in specs:
        await reporter.job_started(spec)
        if spec is job:
            for text in texts:
                await reporter.job_output(spec, text)
            if not finish:
                await reporter.flush()
                return reporter, job
        await reporter.job_finished(spec, "passed", ran=True)
    await reporter.build_finished("passed")
    return reporter, job


async def sse_texts(api: TestClient, token: str, offset: int = 0) -> tuple[str, list[int]]:
    """The joined `text` of a whole event stream from `offset`, and every event's offset."""
    resp = await api.get(
        f"{BUILD}/jobs/s.1/output?offset={offset}",
        headers={**bearer(token), "Accept": "text/event-stream"},
    )
    texts, offsets = [], []
    async for raw in resp.content:
        line = raw.decode()
        if line.startswith("data: "):
            data = json.loads(line.removeprefix("data: "))
            if "text" in data:
                texts.append(data["text"])
                offsets.append(data["offset"])
    return "".join(texts), offsets


async def test_output_over_the_cap_keeps_head_and_tail_with_the_drop_line(
    pool: asyncpg.Pool, blobs: BlobStore, claim: Claim, api: TestClient, token: MakeToken
):
    cap = 64 * 1024
    printed = lines(20000)  # 1 MB
    reporter, job = await run_job(pool, blobs, claim, printed, max_output=cap, finish=False)
    kept = await pool.fetchval("SELECT sum(octet_length(text)) FROM build_job_output")
    assert kept <= cap  # never more than the cap in PostgreSQL, even while it runs
    await reporter.job_finished(job, "passed", ran=True)

    whole = "".join(printed)
    size = len(whole.encode())
    text = await (
        await api.get(f"{BUILD}/jobs/s.1/output", headers=bearer(await token("build:read")))
    ).text()
    row = await pool.fetchrow(
        "SELECT output, output_size, output_printed, output_head, output_tail FROM build_jobs"
        " WHERE id = $1",
        job.id,
    )
    data = text.encode()
    head, tail = data[: row["output_head"]].decode(), data[-row["output_tail"] :].decode()
    assert whole.startswith(head) and whole.endswith(tail)
    assert cap / 2 - 100 <= len(head.encode()) <= cap / 2
    dropped = size - len(head.encode()) - len(tail.encode())
    line = output.drop_line(dropped, size).rstrip("\n")
    assert line == (
        f"[marid: {output.size_text(dropped)} of output dropped here;"
        f" the job printed {output.size_text(size)}]"
    )
    assert text == head + "\n" + line + "\n" + tail  # the head ended mid-line
    assert len(data) <= cap
    assert (row["output"], row["output_size"], row["output_printed"]) == (text, len(data), size)


async def test_output_is_stored_once_and_the_build_composes_it_when_read(
    pool: asyncpg.Pool, blobs: BlobStore, claim: Claim, api: TestClient, token: MakeToken
):
    await run_job(pool, blobs, claim, ["hello\n", "world\n"])
    assert await pool.fetchval("SELECT output FROM builds") is None  # no copy in the build
    assert await pool.fetchval("SELECT count(*) FROM build_job_output") == 0
    stored = await pool.fetch("SELECT output FROM build_jobs ORDER BY position")
    assert [row["output"] for row in stored] == ["", "hello\nworld\n"]
    build = await (await api.get(BUILD, headers=bearer(await token("build:read")))).json()
    assert build["output"] == "hello\nworld\n"


async def test_a_large_output_goes_to_the_blob_store_and_reads_back_byte_identical(
    pool: asyncpg.Pool, blobs: BlobStore, claim: Claim, api: TestClient, token: MakeToken
):
    printed = lines(60000)  # 3 MB, past the row's 1 MiB
    await run_job(pool, blobs, claim, printed)
    whole = "".join(printed).encode()
    row = await pool.fetchrow(
        "SELECT output, output_blob_key, output_size FROM build_jobs WHERE name = 's.1'"
    )
    assert row["output"] is None and row["output_size"] == len(whole)
    assert await blobs.read(row["output_blob_key"]) == whole
    assert await pool.fetchval("SELECT count(*) FROM build_job_output") == 0

    value = await token("build:read")
    raw = await api.get(f"{BUILD}/jobs/s.1/output", headers=bearer(value))
    assert await raw.read() == whole
    assert raw.headers["Content-Length"] == raw.headers["X-Marid-Output-Length"] == str(len(whole))
    # An offset inside a character starts at the next one.
    inside = whole.index("é".encode()) + 1
    rest = await api.get(f"{BUILD}/jobs/s.1/output?offset={inside}", headers=bearer(value))
    assert await rest.read() == whole[inside + 1 :]
    assert rest.headers["Content-Length"] == str(len(whole) - inside - 1)

    text, offsets = await sse_texts(api, value)
    assert text.encode() == whole
    assert offsets[0] == 0 and offsets == sorted(offsets)
    resumed, _ = await sse_texts(api, value, offset=2_000_000)
    assert resumed.encode() == whole[2_000_000:]


async def test_embedded_output_is_bounded_and_says_where_the_rest_is(
    pool: asyncpg.Pool, blobs: BlobStore, claim: Claim, api: TestClient, token: MakeToken
):
    printed = lines(60000)
    await run_job(pool, blobs, claim, printed)
    whole = "".join(printed)
    size = len(whole.encode())
    url = f"https://ci.example.com{BUILD}/jobs/s.1/output"
    value = await token("build:read")
    job = await (await api.get(f"{BUILD}/jobs/s.1", headers=bearer(value))).json()
    first, _, rest = job["output"].partition("\n")
    assert first == (
        f"[marid: {output.size_text(size - len(rest.encode()))} of this job's"
        f" {output.size_text(size)} of output not shown here; all of it: GET {url}]"
    )
    assert whole.endswith(rest) and len(rest.encode()) == output.EMBED_LIMIT
    assert job["build"]["output"] == job["output"]  # the setup job printed nothing
    build = await (await api.get(BUILD, headers=bearer(value))).json()
    assert build["output"] == job["output"]
    listed = await (await api.get(f"{BUILD}/jobs", headers=bearer(value))).json()
    assert [(j["name"], j["output"]) for j in listed][-1] == ("s.1", job["output"])
    listing = await (await api.get("/api/builds", headers=bearer(await token("build:read")))).json()
    assert listing[0]["output"] == job["output"]


async def test_deleting_the_build_deletes_its_output_blob_and_the_reaper_keeps_live_ones(
    pool: asyncpg.Pool, blobs: BlobStore, claim: Claim
):
    await run_job(pool, blobs, claim, lines(60000))
    key = await pool.fetchval("SELECT output_blob_key FROM build_jobs WHERE name = 's.1'")
    reaper = Reaper(pool, blobs, grace=0.0)
    later = datetime.now(UTC) + timedelta(hours=1)
    for _ in range(3):  # orphans go at their second sweep: this one is referenced
        await reaper.tick(later)
    assert await blobs.exists(key)

    await pool.execute("DELETE FROM builds")
    for _ in range(2):
        await reaper.tick(later)
    assert not await blobs.exists(key)


async def test_a_requeued_build_hands_back_its_output_blobs(
    pool: asyncpg.Pool, blobs: BlobStore, claim: Claim
):
    reporter, job = await run_job(pool, blobs, claim, lines(60000), finish=False)
    await reporter.job_finished(job, "passed", ran=True)
    key = await pool.fetchval("SELECT output_blob_key FROM build_jobs WHERE name = 's.1'")
    await pool.execute("UPDATE builds SET lease_expires_at = now() - interval '1 hour'")
    async with pool.acquire() as conn, conn.transaction():
        recovered = await lifecycle.recover_expired(conn, 3)
    assert key in recovered.stale_blobs
    assert await pool.fetchval("SELECT count(output_blob_key) FROM build_jobs") == 0


async def test_both_stores_read_from_an_offset(blob_store: BlobStore):
    data = bytes(range(256)) * 5000  # 1.28 MB: several chunks
    blob = await blob_store.put_bytes(data)
    rest = b"".join([chunk async for chunk in await blob_store.open_at(blob.key, 1000)])
    assert rest == data[1000:]
    end = b"".join([chunk async for chunk in await blob_store.open_at(blob.key, len(data))])
    assert end == b""
    assert await blob_store.read_range(blob.key, 300_000, 70_000) == data[300_000:370_000]
    with pytest.raises(BlobNotFound):
        await blob_store.open_at(new_key(), 0)
