"""A build's jobs (docs/api.md §7.8, §7.9) and their live output (docs/api.md §19)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from marid import builds, jobs, output
from marid.api import errors
from marid.api.auth import CALLER, Caller, bearer, optional
from marid.api.builds import PARAMS, B, readable_build
from marid.api.http import UNTRUSTED_CONTENT, api_url, query
from marid.api.keys import BLOBS, POOL
from marid.api.live import LIVE
from marid.api.openapi import (
    INT,
    NOT_FOUND,
    OPTIONAL,
    OUTPUT,
    STRING,
    TIME,
    URL,
    Operations,
    json_response,
    list_of,
    nullable,
    obj,
    op,
    path_param,
    query_param,
    ref,
)
from marid.blobs import BlobStore
from marid.jobs import Job
from marid.logs import REQUEST_ID
from marid.times import rfc3339
from marid.validation import NotFound

routes = web.RouteTableDef()
KEEPALIVE = 15.0  # seconds without an event before a `: keepalive` comment


@routes.get(B + "/jobs")
@optional
async def list_jobs(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        loaded = await readable_build(conn, request, caller)
        found = await jobs.list_for(
            conn,
            loaded.build.id,
            query(request, "name"),
            query(request, "status"),
            request.config_dict[BLOBS],
        )
    base = api_url(request)
    build_url, build = builds.url(loaded.build, loaded.owner, base), loaded.json(base)
    return web.json_response([jobs.to_json(job, build_url, build) for job in found])


async def load_job(
    conn: asyncpg.Connection, request: web.Request, caller: Caller, excerpt: bool = True
) -> tuple[Job, str, dict[str, object]]:
    loaded = await readable_build(conn, request, caller)
    blobs = request.config_dict[BLOBS]
    job = await jobs.get_by_name(conn, loaded.build.id, request.match_info["name"], blobs, excerpt)
    if job is None:
        raise NotFound()
    base = api_url(request)
    return job, builds.url(loaded.build, loaded.owner, base), loaded.json(base)


@routes.get(B + "/jobs/{name}")
@optional
async def show_job(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        job, build_url, build = await load_job(conn, request, caller)
    return web.json_response(jobs.to_json(job, build_url, build))


def start_offset(request: web.Request) -> int:
    """`Last-Event-ID` (SSE) overrides `offset`; anything malformed counts as 0."""
    raw = request.headers.get("Last-Event-ID") or query(request, "offset") or "0"
    try:
        return max(0, int(raw))
    except ValueError:
        return 0


async def output_from(
    conn: asyncpg.Connection | None,
    blobs: BlobStore,
    job: Job,
    offset: int,
    end: int | None = None,
) -> tuple[list[tuple[int, str]], bool]:
    """About jobs.READ_BYTES of output from byte `offset` (to `end`), wherever it is stored, as
    (offset, text) pieces of at most 64 KiB; and whether more may follow at once. `conn` is
    needed only for output stored as chunks."""
    found: list[tuple[int, str]] = []
    size = 0
    pieces = jobs.read(conn, blobs, job, offset, end)
    try:
        async for start, text in pieces:
            for piece in output.chunks(text):
                found.append((start, piece))
                start += output.byte_length(piece)
            size += output.byte_length(text)
            if size >= jobs.READ_BYTES:
                return found, True
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]
    return found, False


@routes.get(B + "/jobs/{name}/output")
@optional
async def show_output(request: web.Request, caller: Caller) -> web.StreamResponse:
    pool = request.config_dict[POOL]
    async with pool.acquire() as conn:
        job, _, _ = await load_job(conn, request, caller, excerpt=False)
        written = await jobs.live_total(conn, job) if _in_chunks(job) else 0
    if "text/event-stream" in request.headers.get("Accept", ""):
        return await stream(request, job, start_offset(request))
    return await plain(request, job, start_offset(request), jobs.length(job, written), written)


def _in_chunks(job: Job) -> bool:
    """Whether the job's output is (live or stored) chunks: not in its row, nor a blob."""
    return job.stored.text is None and job.stored.blob_key is None


async def plain(
    request: web.Request, job: Job, offset: int, total: int, written: int
) -> web.StreamResponse:
    """The output from `offset` to `total` as text, streamed from storage a batch at a time
    (a database connection is held only while a batch of chunks is read), with its
    Content-Length when the job has ended and its output has no gap (docs/api.md §19)."""
    pool, blobs = request.config_dict[POOL], request.config_dict[BLOBS]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/plain; charset=utf-8",
            **UNTRUSTED_CONTENT,
            "X-Marid-Job-Status": job.status,
            "X-Marid-Output-Length": str(total),
            # The request-log middleware adds it too late for a prepared (streamed) response.
            "X-Request-Id": REQUEST_ID.get(),
        }
    )
    ended = job.stored.ended
    whole = ended and (not _in_chunks(job) or written == total)  # no bytes dropped between
    end = None if ended else total
    while True:
        if _in_chunks(job):
            async with pool.acquire() as conn:
                chunks, more = await output_from(conn, blobs, job, offset, end)
        else:
            chunks, more = await output_from(None, blobs, job, offset, end)
        if not response.prepared:
            if whole:
                response.content_length = total - chunks[0][0] if chunks else 0
            await response.prepare(request)
        if chunks:
            await response.write("".join(text for _, text in chunks).encode())
            offset = chunks[-1][0] + output.byte_length(chunks[-1][1])
        if not more:
            break
    await response.write_eof()
    return response


async def stream(
    request: web.Request,
    job: Job,
    offset: int,
    still_readable: Callable[[web.Request], Awaitable[bool]] | None = None,
) -> web.StreamResponse:
    """Server-Sent Events: output chunks as they are written, then one `status` event.
    `still_readable` re-checks the reader when access may have changed (default: the
    request's token, `_still_readable`; the web interface passes its session's check)."""
    recheck = still_readable or _still_readable
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    pool, live = request.config_dict[POOL], request.config_dict[LIVE]
    blobs = request.config_dict[BLOBS]
    last_event = time.monotonic()
    printed = False  # whether `offset` counts printed bytes of a running job (docs/api.md §19)
    generation = live.access_generation
    with live.subscribe(job.id) as changed:
        while True:
            changed.clear()  # before reading: a notification during the read is kept
            try:
                if live.access_generation != generation:
                    generation = live.access_generation
                    if not await recheck(request):
                        return response  # ended: asked again, the reader gets a 404
                async with pool.acquire() as conn:
                    current = await jobs.get_by_name(conn, job.build_id, job.name, excerpt=False)
                    if current is None:  # the build was deleted
                        return response
                    if printed and current.stored.ended:
                        offset, printed = jobs.final_offset(current.stored, offset), False
                    printed = printed or not current.stored.ended
                    chunks, more = await output_from(conn, blobs, current, offset)
            except Exception as exc:
                reason = errors.database_unavailable(exc)
                if reason is None:
                    raise
                # Too late for a 503: end the stream cleanly; the client resumes with
                # Last-Event-ID once the database is back (docs/api.md §1.4, §19).
                errors.note_outage(request, reason)
                return response
            for start, text in chunks:
                offset = start + len(text.encode())
                data = json.dumps({"offset": start, "text": text})
                await response.write(f"event: output\nid: {offset}\ndata: {data}\n\n".encode())
                last_event = time.monotonic()
            if more:
                continue
            if current.status in builds.FINAL:
                status = {"status": current.status, "finished_at": rfc3339(current.finished_at)}
                await response.write(f"event: status\ndata: {json.dumps(status)}\n\n".encode())
                return response
            # Woken by NOTIFY only (issue 11 row 13): the job's output or end, a change of
            # access, or the database back after an outage (api/live.py).
            while not changed.is_set():
                idle = KEEPALIVE - (time.monotonic() - last_event)
                if idle <= 0:
                    await response.write(b": keepalive\n\n")
                    last_event = time.monotonic()
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), idle)


async def _still_readable(request: web.Request) -> bool:
    """Whether the stream's reader may still read its job, their token looked up again: a
    revoked token, a namespace made private, a collaborator removed end the stream."""
    del request[CALLER]
    caller = await bearer(request)
    try:
        async with request.config_dict[POOL].acquire() as conn:
            await load_job(conn, request, caller, excerpt=False)
    except NotFound:
        return False
    return True


JOB = [*PARAMS, path_param("name", "job name")]
SCHEMAS = {
    "Job": obj(
        {
            "id": INT,
            "build_id": INT,
            "stage": STRING,
            "name": STRING,
            "commands": STRING,
            "status": {"enum": list(builds.STATUSES)},
            "output": OUTPUT,
            "created_at": TIME,
            "started_at": nullable(TIME),
            "finished_at": nullable(TIME),
            "reused_from": nullable(URL),
            "url": URL,
            "build": ref("Build"),
        }
    ),
}
OPERATIONS: Operations = {
    ("get", "/b/{username}/{number}/jobs"): op(
        "Jobs in execution order (build:read; waived when public)",
        {"200": json_response("OK", list_of("Job")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=[
            *PARAMS,
            query_param("name", "job name contains this (case-insensitive)"),
            query_param("status", "exact status; passed also matches passed_with_failures"),
        ],
    ),
    ("get", "/b/{username}/{number}/jobs/{name}"): op(
        "A job (build:read; waived when public)",
        {"200": json_response("OK", ref("Job")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=JOB,
    ),
    ("get", "/b/{username}/{number}/jobs/{name}/output"): op(
        "A job's whole output: plain text streamed from storage, or live Server-Sent Events"
        " with Accept: text/event-stream",
        {
            "200": {
                "description": "Output (text/plain) or an event stream",
                "content": {
                    "text/plain": {"schema": STRING},
                    "text/event-stream": {"schema": STRING},
                },
            },
            **NOT_FOUND,
        },
        security=OPTIONAL,
        parameters=[*JOB, query_param("offset", "start at this byte offset", INT)],
        extension=True,
    ),
}
