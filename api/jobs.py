"""A build's jobs (docs/api.md §7.8, §7.9) and their live output (docs/api.md §19)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import asyncpg
from aiohttp import web

from marid import builds, jobs, output
from marid.api import errors
from marid.api.auth import Caller, optional
from marid.api.builds import PARAMS, B, readable_build
from marid.api.http import api_url, query
from marid.api.keys import POOL
from marid.api.live import LIVE
from marid.api.openapi import (
    INT,
    NOT_FOUND,
    OPTIONAL,
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
from marid.jobs import Job
from marid.times import rfc3339
from marid.validation import NotFound

routes = web.RouteTableDef()
KEEPALIVE = 15.0  # seconds without an event before a `: keepalive` comment
POLL = 1.0  # upper bound on a missed notification's delay


@routes.get(B + "/jobs")
@optional
async def list_jobs(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        loaded = await readable_build(conn, request, caller)
        found = await jobs.list_for(
            conn, loaded.build.id, query(request, "name"), query(request, "status")
        )
    base = api_url(request)
    build_url, build = builds.url(loaded.build, loaded.owner, base), loaded.json(base)
    return web.json_response([jobs.to_json(job, build_url, build) for job in found])


async def load_job(
    conn: asyncpg.Connection, request: web.Request, caller: Caller
) -> tuple[Job, str, dict[str, object]]:
    loaded = await readable_build(conn, request, caller)
    job = await jobs.get_by_name(conn, loaded.build.id, request.match_info["name"])
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


async def output_from(conn: asyncpg.Connection, job: Job, offset: int) -> list[tuple[int, str]]:
    """Output chunks from byte `offset`: the stored output of a finished job, else the live
    chunks written so far."""
    if job.status in builds.FINAL and job.output is not None:
        raw = job.output.encode()
        offset = output.char_boundary(raw, offset)
        rest = raw[offset:].decode()
        chunks, start = [], offset
        for text in output.chunks(rest):
            chunks.append((start, text))
            start += len(text.encode())
        return chunks
    found, _ = await jobs.output_since(conn, job.id, offset)
    return found


@routes.get(B + "/jobs/{name}/output")
@optional
async def show_output(request: web.Request, caller: Caller) -> web.StreamResponse:
    pool = request.config_dict[POOL]
    async with pool.acquire() as conn:
        job, _, _ = await load_job(conn, request, caller)
        if "text/event-stream" not in request.headers.get("Accept", ""):
            chunks = await output_from(conn, job, start_offset(request))
            if job.status in builds.FINAL and job.output is not None:
                total = len(job.output.encode())
            else:
                total = (await jobs.output_since(conn, job.id, 0))[1]
            return web.Response(
                text="".join(text for _, text in chunks),
                content_type="text/plain",
                headers={"X-Marid-Job-Status": job.status, "X-Marid-Output-Length": str(total)},
            )
    return await stream(request, job, start_offset(request))


async def stream(request: web.Request, job: Job, offset: int) -> web.StreamResponse:
    """Server-Sent Events: output chunks as they are written, then one `status` event."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    pool, live = request.config_dict[POOL], request.config_dict[LIVE]
    last_event = time.monotonic()
    with live.subscribe(job.id) as changed:
        while True:
            changed.clear()  # before reading: a notification during the read is kept
            try:
                async with pool.acquire() as conn:
                    current = await jobs.get_by_name(conn, job.build_id, job.name)
                    assert current is not None
                    chunks = await output_from(conn, current, offset)
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
            if current.status in builds.FINAL:
                status = {"status": current.status, "finished_at": rfc3339(current.finished_at)}
                await response.write(f"event: status\ndata: {json.dumps(status)}\n\n".encode())
                return response
            if time.monotonic() - last_event >= KEEPALIVE:
                await response.write(b": keepalive\n\n")
                last_event = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), POLL)


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
            "output": nullable(STRING),
            "created_at": TIME,
            "started_at": nullable(TIME),
            "finished_at": nullable(TIME),
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
        "A job's output: plain text, or live Server-Sent Events with Accept: text/event-stream",
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
