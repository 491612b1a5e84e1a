"""The runner protocol (docs/runners.md): how a runner on another machine, holding no database
DSN and no crypto key, registers, claims builds and reports on them over HTTP.

Three tokens (marid/remote.py): an enrolment token registers a runner (`POST /runner/register`)
and gets it a runner token; the runner token says it is alive (`/runner/heartbeat`) and claims
builds (`/runner/claim`, a long poll answered at once when work is queued); each claim hands
out a job token good for that build's attempt alone. Every request about a build names it and
carries its job token, and passes the same fence an in-process runner's writes pass
(marid/lifecycle.py): once the attempt has ended, or for another build, the answer is 404 and
nothing changes. The writes themselves are marid/reports.py's and marid/lifecycle.py's, the
ones an in-process runner makes.

Runner-token failures answer 401 (`{"message", "revoked"}`); job-token failures 404. These
routes are not rate limited per caller (a runner's requests are its builds' work).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiohttp import web

from marid import caches, lifecycle, output, plans, remote, reports, runners, webhooks
from marid.api.http import path_id, query, read_body
from marid.api.keys import BLOBS, CIPHER, CONFIG, POOL
from marid.api.live import LIVE
from marid.api.openapi import (
    BOOL,
    INT,
    STRING,
    Operations,
    json_response,
    nullable,
    obj,
    op,
    path_param,
    query_param,
    ref,
)
from marid.api.uploads import CHUNK_SIZE, send_blob
from marid.blobs import Blob, BlobNotFound, BlobTooLarge
from marid.lifecycle import Claim, LostLease
from marid.validation import Errors, NotFound, RequestError, ValidationError

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

POLL = 5.0  # seconds between looks at the queue while a claim waits without a NOTIFY
MAX_WAIT = 60.0  # seconds a claim may wait for work
PRESIGNED_FOR = 600.0  # seconds a presigned download URL works
MIN_LEASE, MAX_LEASE = 1.0, 600.0  # seconds a claim or renewal may lease a build for
STATUSES = ("passed", "passed_with_failures", "failed", "killed", "timed_out")
JOB_STATUSES = (*STATUSES, "queued")  # a job that never ran ends with the build's status


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _refused(message: str, revoked: bool = False) -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(
        text=json.dumps({"message": message, "revoked": revoked}),
        content_type="application/json",
        headers={"WWW-Authenticate": 'Bearer realm="marid runners"'},
    )


async def _runner(request: web.Request) -> remote.Registered:
    """The registered runner of the request's runner token; 401 otherwise."""
    async with request.config_dict[POOL].acquire() as conn:
        found = await remote.runner_of(conn, _bearer(request))
    if found is None:
        raise _refused("Unknown runner token")
    if found.revoked:
        raise _refused("This runner was revoked", revoked=True)
    return found


async def _attempt(request: web.Request) -> Claim:
    """The attempt the request's job token is good for, if it holds the build in the path;
    404 otherwise (docs/runners.md §4)."""
    build_id = path_id(request)
    async with request.config_dict[POOL].acquire() as conn:
        claim = await remote.claim_of(conn, build_id, _bearer(request))
    if claim is None:
        raise NotFound()
    return claim


def _number(
    body: Errors, data: dict[str, Any], key: str, low: float, high: float, default: float
) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        body.add(key, f"{key.capitalize()} must be a number from {low:g} to {high:g}")
        return default
    return float(value)


def _only(data: dict[str, Any], known: tuple[str, ...], errors: Errors) -> None:
    for name in sorted(set(data) - set(known)):
        errors.add(name, "Unknown field")


# -- Registration and presence ------------------------------------------------------------------


@routes.post("/runner/register")
async def register(request: web.Request) -> web.Response:
    """Register a runner with an enrolment token; answers its runner token (shown once)."""
    body = await read_body(request)
    said = remote.check_announcement(body.data, body.errors)
    config = request.config_dict[CONFIG]
    async with request.config_dict[POOL].acquire() as conn:
        enrolment = await remote.enrolment_of(conn, _bearer(request))
        if enrolment is None:
            raise _refused("Unknown or expired enrolment token")
        body.errors.raise_if_any()
        assert said is not None
        async with conn.transaction():
            runner, value = await remote.register(
                conn,
                enrolment,
                said,
                request.remote,
                config.runner.max_attempts,
                config.server.api_url,
            )
    for key in runner.stale_blobs:
        with contextlib.suppress(Exception):  # else the reaper removes it later
            await request.config_dict[BLOBS].delete(key)
    log.info("runner %s registered (id %d) from %s", runner.name, runner.id, request.remote)
    return web.json_response(
        {
            "id": runner.id,
            "name": runner.name,
            "token": value,
            "instance": runners.instance_of(config.database.dsn),
        },
        status=201,
    )


@routes.post("/runner/heartbeat")
async def heartbeat(request: web.Request) -> web.Response:
    """The runner is alive and says what it offers; expired leases are recovered here too, so
    that a dead runner's builds are requeued while every other runner is busy."""
    runner = await _runner(request)
    body = await read_body(request)
    said = remote.check_announcement(body.data, body.errors)
    body.errors.raise_if_any()
    assert said is not None
    async with request.config_dict[POOL].acquire() as conn:
        await remote.heartbeat(conn, runner, said, request.remote)
    await _recover(request)
    return web.json_response({"id": runner.id, "name": runner.name})


@routes.delete("/runner/session")
async def withdraw(request: web.Request) -> web.Response:
    """The runner stops: its token stops working (it registers again when it starts)."""
    runner = await _runner(request)
    async with request.config_dict[POOL].acquire() as conn:
        await remote.withdraw(conn, runner)
    return web.Response(status=204)


# -- Claims -------------------------------------------------------------------------------------


@routes.post("/runner/claim")
async def claim(request: web.Request) -> web.Response:
    """The oldest queued build this runner may take, claimed for it: its plan, with its
    secrets, and the attempt's job token. Waits up to `wait` seconds for one; 204 when none
    came."""
    runner = await _runner(request)
    body = await read_body(request)
    _only(body.data, ("wait", "lease"), body.errors)
    config = request.config_dict[CONFIG]
    wait = _number(body.errors, body.data, "wait", 0, MAX_WAIT, 30.0)
    lease = _number(body.errors, body.data, "lease", MIN_LEASE, MAX_LEASE, config.runner.lease)
    body.errors.raise_if_any()
    pool, live = request.config_dict[POOL], request.config_dict[LIVE]
    deadline = time.monotonic() + wait
    while True:
        woken = live.queue_event()  # taken before looking: a NOTIFY meanwhile is not lost
        async with pool.acquire() as conn:  # its heartbeats keep it alive: only a read here
            offer = await conn.fetchrow(
                """
                SELECT drivers, places, max_running_per_user FROM runners
                WHERE id = $1 AND revoked_at IS NULL
                """,
                runner.id,
            )
        if offer is None:
            raise _refused("This runner was revoked", revoked=True)
        if request.transport is None or request.transport.is_closing() or live.stopping:
            # The runner gave up, or this server stops: take nothing for it.
            return web.Response(status=204)
        await _recover(request)
        found = await _claim_one(request, runner, offer, lease)
        if found is not None:
            return web.json_response(found)
        left = deadline - time.monotonic()
        if left <= 0:
            return web.Response(status=204)
        async with pool.acquire() as conn:
            due = await lifecycle.next_retry(conn, list(offer["drivers"]))
        pause = min(left, POLL, POLL if due is None else due + 0.01)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), pause)


async def _claim_one(
    request: web.Request, runner: remote.Registered, offer: Any, lease: float
) -> dict[str, Any] | None:
    """Claim one build for the runner, as an in-process runner would (lifecycle.claim), with
    its job token; None when there is none. A build whose plan cannot be made (a secret that
    does not decrypt) has its attempt handed back, and the next is looked at."""
    config = request.config_dict[CONFIG]
    pool = request.config_dict[POOL]
    while True:
        async with pool.acquire() as conn, conn.transaction():
            claimed = await lifecycle.claim(
                conn,
                runner.name,
                list(offer["drivers"]),
                lease,
                offer["max_running_per_user"],
                list(offer["places"]),
            )
            if claimed is None:
                return None
            token = await remote.issue_job_token(conn, claimed)
            await webhooks.emit_build(
                conn, claimed.build_id, "build.started", config.server.api_url
            )
        try:
            async with pool.acquire() as conn:
                plan, _, _ = await plans.make(conn, claimed, request.config_dict[CIPHER], config)
        except Exception as exc:
            reason = f"preparing the build: {exc or type(exc).__name__}"
            log.warning("build %d: attempt %d: %s", claimed.build_id, claimed.attempt, reason)
            with contextlib.suppress(LostLease):  # recovered meanwhile
                await _hand_back(request, claimed, reason, config.runner.retry_delay)
            continue
        log.info(
            "build %d: attempt %d claimed by runner %s",
            claimed.build_id,
            claimed.attempt,
            runner.name,
        )
        return {"plan": plan.to_json(), "job_token": token, "lease": lease}


async def _recover(request: web.Request) -> None:
    """Requeue the builds whose runner's lease expired, as every runner's loop does."""
    app = request.config_dict
    config, pool = app[CONFIG], app[POOL]
    async with pool.acquire() as conn, conn.transaction():
        recovered = await lifecycle.recover_expired(conn, config.runner.max_attempts)
        for build_id in [*recovered.killed, *recovered.failed]:
            await webhooks.emit_build(conn, build_id, "build.finished", config.server.api_url)
    for build_id in recovered.build_ids:
        log.warning("build %d: its runner's lease expired; requeued", build_id)
    for key in recovered.stale_blobs:
        with contextlib.suppress(Exception):  # else the reaper removes it later
            await app[BLOBS].delete(key)


async def _hand_back(request: web.Request, claim: Claim, reason: str, delay: float) -> None:
    app = request.config_dict
    config = app[CONFIG]
    async with app[POOL].acquire() as conn, conn.transaction():
        over = await lifecycle.attempt_failed(
            conn, claim, reason, config.runner.max_attempts, delay
        )
        if not over.retried:
            await webhooks.emit_build(conn, claim.build_id, "build.finished", config.server.api_url)
    for key in over.stale_blobs:
        with contextlib.suppress(Exception):
            await app[BLOBS].delete(key)


# -- A claimed attempt (job token) --------------------------------------------------------------


@routes.post(r"/runner/builds/{id:\d+}/renew")
async def renew(request: web.Request) -> web.Response:
    """Extend the attempt's lease; says whether a kill was asked."""
    build_id = path_id(request)
    body = await read_body(request)
    _only(body.data, ("lease",), body.errors)
    lease = _number(body.errors, body.data, "lease", MIN_LEASE, MAX_LEASE, 30.0)
    body.errors.raise_if_any()
    try:
        async with request.config_dict[POOL].acquire() as conn, conn.transaction():
            claim = await remote.claim_of(conn, build_id, _bearer(request))
            if claim is None:
                raise NotFound()
            killed = await lifecycle.renew(conn, claim, lease)
    except LostLease:
        raise NotFound() from None
    return web.json_response({"kill": killed})


@routes.post(r"/runner/builds/{id:\d+}/fail")
async def fail(request: web.Request) -> web.Response:
    """The attempt failed outside the user's commands: a new attempt after `delay` seconds,
    or the build ends `failed` on its last (lifecycle.attempt_failed)."""
    claim = await _attempt(request)
    body = await read_body(request)
    _only(body.data, ("reason", "delay"), body.errors)
    reason: Any = body.data.get("reason")
    if not isinstance(reason, str) or not 0 < len(reason) <= 2000:
        body.errors.add("reason", "Reason must be a string of 1 to 2000 characters")
    delay = _number(body.errors, body.data, "delay", 0, 86400, 0.0)
    body.errors.raise_if_any()
    try:
        await _hand_back(request, claim, reason, delay)
    except LostLease:
        raise NotFound() from None
    return web.Response(status=204)


def _job_id(request: web.Request) -> int:
    return path_id(request, "job")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


MAX_EVENTS = 1000
MAX_AGO = MAX_LEASE * 2  # seconds before its request an event may have happened (its retries)


@routes.post(r"/runner/builds/{id:\d+}/events")
async def events(request: web.Request) -> web.Response:
    """What the attempt did, in order (docs/runners.md §4): jobs started, output, jobs
    finished, objects and keys placed, and the build's end. Applied in as few transactions as
    possible, each fenced: once the attempt has ended, 404 and nothing changes. A runner sends
    what happened in the last tenth of a second in one request."""
    build_id = path_id(request)
    body = await read_body(request)
    _only(body.data, ("events",), body.errors)
    given = body.data.get("events")
    if not isinstance(given, list) or not 0 < len(given) <= MAX_EVENTS:
        body.errors.add("events", f"Events must be a list of 1 to {MAX_EVENTS} events")
        given = []
    steps = [_event(index, event, body.errors) for index, event in enumerate(given)]
    if any(isinstance(step, _End) for step in steps[:-1]):
        body.errors.add("events", "The build's end must be the last event")
    body.errors.raise_if_any()
    config, pool = request.config_dict[CONFIG], request.config_dict[POOL]
    token = _bearer(request)
    pending = [step for step in steps if step is not None]  # none is None: no errors
    try:
        while pending:
            async with pool.acquire() as conn, conn.transaction():
                claim = await remote.claim_of(conn, build_id, token)
                if claim is None:
                    raise NotFound()
                await lifecycle.fence(conn, claim)
                while pending and not _stored(pending[0]):
                    await pending.pop(0).apply(conn, claim, config)
            if pending:  # a job whose output goes to the blob store: transactions of its own
                finish = pending.pop(0)
                assert isinstance(finish, _Finish)
                await reports.finish_job(
                    pool,
                    request.config_dict[BLOBS],
                    claim,
                    finish.job,
                    finish.status,
                    finish.ran,
                    finish.written,
                    finish.ago,
                )
    except LostLease:
        raise NotFound() from None
    except reports.StorageFailed as exc:
        raise RequestError(str(exc), 503) from exc
    return web.Response(status=204)


def _stored(step: Any) -> bool:
    """Whether the step is a job's end whose output is stored in the blob store."""
    return isinstance(step, _Finish) and step.written is not None and step.stores


class _Start:
    def __init__(self, job: int, ago: float) -> None:
        self.job, self.ago = job, ago

    async def apply(self, conn: Any, claim: Claim, config: Any) -> None:
        await lifecycle.job_started(conn, claim, self.job, self.ago)


class _Output:
    def __init__(self, job: int, chunks: list[tuple[int, str]], forget: Any) -> None:
        self.job, self.chunks, self.forget = job, chunks, forget

    async def apply(self, conn: Any, claim: Claim, config: Any) -> None:
        await reports.append(conn, claim, self.job, self.chunks, self.forget)


class _Finish:
    def __init__(
        self, job: int, status: str, ran: bool, written: output.Written | None, ago: float
    ) -> None:
        self.job, self.status, self.ran, self.written = job, status, ran, written
        self.ago = ago
        self.stores = bool(ran and written and written.rewritten)

    async def apply(self, conn: Any, claim: Claim, config: Any) -> None:
        await lifecycle.job_finished(conn, claim, self.job, self.status, self.ran, ago=self.ago)


class _Object:
    def __init__(self, object_id: int) -> None:
        self.object_id = object_id

    async def apply(self, conn: Any, claim: Claim, config: Any) -> None:
        await lifecycle.object_placed(conn, claim, self.object_id)


class _Key:
    def __init__(self, name: str, location: str) -> None:
        self.name, self.location = name, location

    async def apply(self, conn: Any, claim: Claim, config: Any) -> None:
        await lifecycle.key_placed(conn, claim, self.name, self.location)


class _End:
    def __init__(self, status: str, kept: dict[str, str] | None) -> None:
        self.status, self.kept = status, kept

    async def apply(self, conn: Any, claim: Claim, config: Any) -> None:
        kept = None
        if self.kept is not None:
            where = self.kept
            kept = lifecycle.KeptWorkspace(
                claim.build_id, claim.attempt, where["driver"], where["place"], where["location"]
            )
        await reports.finish_build(
            conn, claim, self.status, kept, config.builds.keep_workspace, config.server.api_url
        )


Step = _Start | _Output | _Finish | _Object | _Key | _End


def _event(index: int, event: Any, errors: Errors) -> Step | None:
    """The step of one event, or None with an error naming it (`events`: `event 3: …`)."""
    fields = {
        "start": ("job", "ago"),
        "output": ("job", "chunks", "forget"),
        "finish": ("job", "status", "ran", "written", "ago"),
        "object": ("object",),
        "key": ("name", "location"),
        "end": ("status", "kept"),
    }
    kind = event.get("type") if isinstance(event, dict) else None
    if not isinstance(kind, str) or kind not in fields:
        errors.add("events", f"event {index}: type must be one of {', '.join(fields)}")
        return None
    problems = Errors()
    _only({k: v for k, v in event.items() if k != "type"}, fields[kind], problems)
    job = event.get("job")
    if "job" in fields[kind] and not _count(job):
        problems.add("job", "Job must be a job id")
    ago = _number(problems, event, "ago", 0, MAX_AGO, 0.0)
    step = _build_step(kind, event, job, ago, problems)
    for name, messages in problems.by_field.items():
        for message in messages:
            errors.add("events", f"event {index}: {name}: {message}")
    return None if problems.by_field else step


def _build_step(
    kind: str, event: dict[str, Any], job: Any, ago: float, problems: Errors
) -> Step | None:
    if kind == "start":
        return _Start(job, ago)
    if kind == "output":
        chunks = event.get("chunks")
        if not isinstance(chunks, list) or not all(
            isinstance(c, list) and len(c) == 2 and _count(c[0]) and isinstance(c[1], str)
            for c in chunks
        ):
            problems.add("chunks", "Chunks must be a list of [byte offset, text] pairs")
            return None
        forget = event.get("forget")
        if forget is not None and not (
            isinstance(forget, list) and len(forget) == 2 and all(_count(v) for v in forget)
        ):
            problems.add("forget", "Forget must be null or a [start, end] pair of byte offsets")
            return None
        gone = (int(forget[0]), int(forget[1])) if forget else None
        return _Output(job, [(int(offset), text) for offset, text in chunks], gone)
    if kind == "finish":
        status, ran = event.get("status"), event.get("ran")
        if status not in JOB_STATUSES:
            problems.add("status", f"Status must be one of {', '.join(JOB_STATUSES)}")
        if not isinstance(ran, bool):
            problems.add("ran", "Ran must be a boolean")
        written = _written(event.get("written"), problems)
        if problems.by_field:
            return None
        return _Finish(job, str(status), bool(ran), written, ago)
    if kind == "object":
        if not _count(event.get("object")):
            problems.add("object", "Object must be a build object's id")
            return None
        return _Object(int(event["object"]))
    if kind == "key":
        name, location = event.get("name"), event.get("location")
        if not isinstance(name, str) or not 0 < len(name) <= 255:
            problems.add("name", "Name must be a key's name")
        if not isinstance(location, str) or not 0 < len(location) <= 4096:
            problems.add("location", "Location must be a string of 1 to 4096 characters")
        return None if problems.by_field else _Key(str(name), str(location))
    status, kept = event.get("status"), event.get("kept")
    if status not in STATUSES:
        problems.add("status", f"Status must be one of {', '.join(STATUSES)}")
    if kept is not None and not (
        isinstance(kept, dict)
        and set(kept) == {"driver", "place", "location"}
        and all(isinstance(v, str) and 0 < len(v) <= 4096 for v in kept.values())
    ):
        problems.add("kept", "Kept must be null or {driver, place, location}")
    return None if problems.by_field else _End(str(status), kept)


def _written(value: Any, errors: Errors) -> output.Written | None:
    if value is None:
        return None
    message = "Written must be null or {printed, head, head_newline, tail}"
    if not isinstance(value, dict) or set(value) - {"printed", "head", "head_newline", "tail"}:
        errors.add("written", message)
        return None
    head = value.get("head")
    newline = value.get("head_newline", True)
    counts = [value.get("printed"), value.get("tail", 0)]
    if not all(_count(c) for c in counts) or (head is not None and not _count(head)):
        errors.add("written", message)
        return None
    if not isinstance(newline, bool):
        errors.add("written", message)
        return None
    written = output.Written(counts[0], head, newline, counts[1])
    if not written.valid():
        errors.add("written", "Written does not add up")
        return None
    return written


# -- Content: objects, images, artifacts, caches ------------------------------------------------


@routes.get(r"/runner/builds/{id:\d+}/objects/{object:\d+}")
async def object_content(request: web.Request) -> web.StreamResponse:
    """The content of one of the build's objects."""
    claim = await _attempt(request)
    async with request.config_dict[POOL].acquire() as conn:
        row = await conn.fetchrow(
            """
            SELECT o.blob_key, o.size FROM build_objects bo JOIN objects o ON o.id = bo.object_id
            WHERE bo.build_id = $1 AND bo.id = $2 AND o.blob_key IS NOT NULL
            """,
            claim.build_id,
            path_id(request, "object"),
        )
    if row is None:
        raise NotFound()
    return await _send(request, row["blob_key"], row["size"])


async def _send(
    request: web.Request, key: str, size: int, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    """The blob's content; with S3 (`storage.s3.presign`), a redirect to a presigned URL,
    so that the content does not pass through the API (docs/runners.md §6)."""
    blobs, storage = request.config_dict[BLOBS], request.config_dict[CONFIG].storage
    if storage.backend == "s3" and storage.s3.presign:
        try:
            url = await blobs.download_url(key, PRESIGNED_FOR)
        except BlobNotFound:
            raise NotFound() from None
        if url is not None:
            raise web.HTTPTemporaryRedirect(url, headers=headers)
    return await send_blob(request, blobs, key, "application/octet-stream", size, headers)


async def _image(request: web.Request) -> tuple[str, int, str]:
    """The stored upload (blob key, size, sha256) the build may use that the query names."""
    claim = await _attempt(request)
    driver, name = query(request, "driver"), query(request, "name")
    errors = Errors()
    if driver not in ("docker", "qemu"):
        errors.add("driver", "Driver must be docker or qemu")
    if not name:
        errors.add("name", "Name field required")
    errors.raise_if_any()
    assert driver is not None and name is not None
    async with request.config_dict[POOL].acquire() as conn:
        row = await conn.fetchrow(
            """
            SELECT i.blob_key, i.size, i.sha256 FROM builds b JOIN images i
              ON i.driver = $2 AND i.name = $3 AND i.blob_key IS NOT NULL
             AND CASE WHEN b.namespace_id IS NULL
                 THEN i.namespace_id IS NULL AND NOT i.detached AND i.user_id = b.user_id
                 ELSE i.namespace_id = b.namespace_id END
            WHERE b.id = $1
            """,
            claim.build_id,
            driver,
            name,
        )
    if row is None:
        raise NotFound()
    return row["blob_key"], row["size"], row["sha256"]


@routes.get(r"/runner/builds/{id:\d+}/image")
async def image(request: web.Request) -> web.Response:
    """The uploaded image of `driver` named `name` the build may use (docs/manifest.md §9.2
    step 1): its size and SHA-256; 404 when there is none."""
    _, size, sha256 = await _image(request)
    return web.json_response({"size": size, "sha256": sha256})


@routes.get(r"/runner/builds/{id:\d+}/image/content")
async def image_content(request: web.Request) -> web.StreamResponse:
    key, size, _ = await _image(request)
    return await _send(request, key, size)


@routes.put(r"/runner/builds/{id:\d+}/jobs/{job:\d+}/artifacts")
async def artifact(request: web.Request) -> web.Response:
    """The content of an artifact the job collected, as the raw body; `source` and `name` in
    the query. 400 when the build declares no such artifact, 413 past artifacts.max_size."""
    claim = await _attempt(request)
    job_id = _job_id(request)
    source, name = query(request, "source"), query(request, "name")
    errors = Errors()
    if not source:
        errors.add("source", "Source field required")
    if not name:
        errors.add("name", "Name field required")
    errors.raise_if_any()
    assert source is not None and name is not None
    config, blobs = request.config_dict[CONFIG], request.config_dict[BLOBS]
    blob = await _receive(request, config.artifacts.max_size)
    try:
        await reports.record_artifact(
            request.config_dict[POOL], blobs, claim, job_id, source, name, blob
        )
    except LostLease:
        raise NotFound() from None
    except LookupError:
        raise ValidationError({"name": ["The build declares no such artifact"]}) from None
    return web.Response(status=204)


async def _receive(request: web.Request, max_size: int) -> Blob:
    """The request body, streamed into the blob store."""
    try:
        return await request.config_dict[BLOBS].put(
            request.content.iter_chunked(CHUNK_SIZE), max_size
        )
    except BlobTooLarge:
        raise RequestError("Request body too large", 413) from None


async def _cache(request: web.Request) -> tuple[Claim, caches.BuildCache]:
    claim = await _attempt(request)
    async with request.config_dict[POOL].acquire() as conn:
        found = await caches.of_build(conn, claim.build_id)
    if found is None:
        raise NotFound()
    return claim, found


@routes.get(r"/runner/builds/{id:\d+}/cache")
async def cache_content(request: web.Request) -> web.StreamResponse:
    """The saved entry of the build's cache scope, as a tar; its paths and the build that
    saved it in headers. 204 when there is none."""
    _, found = await _cache(request)
    async with request.config_dict[POOL].acquire() as conn:
        entry = await caches.use(conn, found.scope, found.key)
    if entry is None:
        return web.Response(status=204)
    headers = {
        "X-Marid-Cache-Paths": json.dumps(entry.paths),
        "X-Marid-Cache-Build": "" if entry.build_number is None else str(entry.build_number),
    }
    try:
        return await _send(request, entry.blob_key, entry.size, headers)
    except NotFound:  # replaced or deleted since the row was read
        return web.Response(status=204)


@routes.put(r"/runner/builds/{id:\d+}/cache")
async def cache_save(request: web.Request) -> web.Response:
    """Save the build's cache: the raw body is the tar of `paths` (a JSON list in the query).
    Answers its size and the keys of the entries evicted to make room."""
    claim, found = await _cache(request)
    try:
        paths = json.loads(query(request, "paths") or "")
    except ValueError:
        paths = None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValidationError({"paths": ["Paths must be a JSON list of workspace paths"]})
    unknown = set(paths) - set(found.paths)
    if not paths or unknown:
        raise ValidationError({"paths": ["Paths must be paths of the build's cache"]})
    config, blobs = request.config_dict[CONFIG], request.config_dict[BLOBS]
    limit = min(config.caches.max_size, config.caches.max_total)
    blob = await _receive(request, limit)
    try:
        stored = await caches.keep(
            request.config_dict[POOL],
            blobs,
            found,
            paths,
            blob,
            claim.build_id,
            config.caches.max_total,
            claim,
        )
    except LostLease:
        raise NotFound() from None
    return web.json_response({"size": blob.size, "evicted": stored.evicted})


# -- The runner's reaper ------------------------------------------------------------------------


@routes.post("/runner/sweep")
async def sweep(request: web.Request) -> web.Response:
    """What a runner's reaper needs to know (runner/reaper.py): which of `builds`' attempts are
    live, the longest time limit of a running build, and of the workspaces kept at `places`
    those still kept and those to remove."""
    await _runner(request)
    body = await read_body(request)
    _only(body.data, ("builds", "places"), body.errors)
    builds, places = body.data.get("builds", []), body.data.get("places", [])
    if not isinstance(builds, list) or not all(_count(b) for b in builds) or len(builds) > 10000:
        body.errors.add("builds", "Builds must be a list of up to 10000 build ids")
    if not isinstance(places, list) or not all(isinstance(p, str) for p in places):
        body.errors.add("places", "Places must be a list of strings")
    elif len(places) > remote.MAX_PLACES:
        body.errors.add("places", f"Places has at most {remote.MAX_PLACES} entries")
    body.errors.raise_if_any()
    from marid import reaper

    async with request.config_dict[POOL].acquire() as conn:
        live = await reaper.live_attempts(conn, builds)
        longest = await reaper.longest_running_timeout(conn)
        kept = {}
        for place in places:
            still, expired = await reaper.kept_at(conn, place)
            kept[place] = {"kept": sorted(still), "expired": sorted(expired)}
        await reaper.forget_kept_volumes(conn)
    return web.json_response(
        {"live": sorted([b, a] for b, a in live), "longest_timeout": longest, "kept": kept}
    )


# -- OpenAPI ------------------------------------------------------------------------------------

RUNNER_TOKEN: list[dict[str, list[str]]] = [{"runnerToken": []}]
JOB_TOKEN: list[dict[str, list[str]]] = [{"jobToken": []}]
ENROLMENT_TOKEN: list[dict[str, list[str]]] = [{"enrolmentToken": []}]
NO_CONTENT = {"204": {"description": "Done"}}
REFUSED = {"401": json_response("Unknown or revoked token", ref("RunnerRefusal"))}
GONE = {"404": json_response("Not this attempt's job token, or the attempt ended", ref("Message"))}
BUILD = [path_param("id", "build id")]
JOB = [*BUILD, path_param("job", "job id")]
NUMBER = {"type": "number"}
STRINGS = {"type": "array", "items": STRING}

SCHEMAS = {
    "RunnerRefusal": obj({"message": STRING, "revoked": BOOL}),
    "RunnerAnnouncement": obj(
        {
            "name": STRING,
            "version": STRING,
            "hostname": STRING,
            "drivers": STRINGS,
            "labels": STRINGS,
            "parallelism": INT,
            "places": STRINGS,
            "max_running_per_user": nullable(INT),
            "interval": NUMBER,
        },
        optional=("version", "hostname", "labels", "places", "max_running_per_user", "interval"),
    ),
    "RunnerEvent": {
        "type": "object",
        "description": "one of start {job}, output {job, chunks, forget}, finish {job, status,"
        " ran, written}, object {object}, key {name, location}, end {status, kept}"
        " (docs/runners.md §4)",
        "properties": {"type": {"enum": ["start", "output", "finish", "object", "key", "end"]}},
        "required": ["type"],
    },
    "RunnerRegistration": obj({"id": INT, "name": STRING, "token": STRING, "instance": STRING}),
    "RunnerClaim": obj(
        {
            "plan": {"type": "object", "description": "the build's plan (docs/runners.md §3)"},
            "job_token": STRING,
            "lease": NUMBER,
        }
    ),
}

OPERATIONS: Operations = {
    ("post", "/runner/register"): op(
        "Register a runner with an enrolment token; the runner token is shown once",
        {"201": json_response("Registered", ref("RunnerRegistration")), **REFUSED},
        security=ENROLMENT_TOKEN,
        body=ref("RunnerAnnouncement"),
        extension=True,
    ),
    ("post", "/runner/heartbeat"): op(
        "Say the runner is alive and what it offers",
        {"200": json_response("OK", obj({"id": INT, "name": STRING})), **REFUSED},
        security=RUNNER_TOKEN,
        body=ref("RunnerAnnouncement"),
        extension=True,
    ),
    ("delete", "/runner/session"): op(
        "The runner stops: its token stops working",
        {**NO_CONTENT, **REFUSED},
        security=RUNNER_TOKEN,
        extension=True,
    ),
    ("post", "/runner/claim"): op(
        "Claim a queued build, waiting up to `wait` seconds for one (long poll)",
        {
            "200": json_response("Claimed", ref("RunnerClaim")),
            "204": {"description": "No build came within `wait`"},
            **REFUSED,
        },
        security=RUNNER_TOKEN,
        body=obj({"wait": NUMBER, "lease": NUMBER}, optional=("wait", "lease")),
        extension=True,
    ),
    ("post", "/runner/sweep"): op(
        "What the runner's reaper may remove",
        {"200": json_response("OK", {"type": "object"}), **REFUSED},
        security=RUNNER_TOKEN,
        body=obj({"builds": {"type": "array", "items": INT}, "places": STRINGS}),
        extension=True,
    ),
    ("post", "/runner/builds/{id}/renew"): op(
        "Renew the attempt's lease; says whether a kill was asked",
        {"200": json_response("OK", obj({"kill": BOOL})), **GONE},
        security=JOB_TOKEN,
        body=obj({"lease": NUMBER}, optional=("lease",)),
        extension=True,
        parameters=BUILD,
    ),
    ("post", "/runner/builds/{id}/fail"): op(
        "The attempt failed outside the user's commands: hand the build back",
        {**NO_CONTENT, **GONE},
        security=JOB_TOKEN,
        body=obj({"reason": STRING, "delay": NUMBER}, optional=("delay",)),
        extension=True,
        parameters=BUILD,
    ),
    ("post", "/runner/builds/{id}/events"): op(
        "What the attempt did, in order: jobs started, output, jobs finished, objects and keys"
        " placed, the build's end",
        {**NO_CONTENT, **GONE},
        security=JOB_TOKEN,
        body=obj({"events": {"type": "array", "items": ref("RunnerEvent")}}),
        extension=True,
        parameters=BUILD,
    ),
    ("put", "/runner/builds/{id}/jobs/{job}/artifacts"): op(
        "Upload an artifact the job collected (raw body)",
        {**NO_CONTENT, **GONE},
        security=JOB_TOKEN,
        extension=True,
        parameters=[
            *JOB,
            query_param("source", "where in the workspace it was collected from"),
            query_param("name", "the artifact's name"),
        ],
    ),
    ("get", "/runner/builds/{id}/objects/{object}"): op(
        "Download an object the build places",
        {"200": {"description": "The content"}, **GONE},
        security=JOB_TOKEN,
        extension=True,
        parameters=[*BUILD, path_param("object", "the build object's id")],
    ),
    ("get", "/runner/builds/{id}/image"): op(
        "The uploaded image of the build's driver named `name`",
        {"200": json_response("Found", obj({"size": INT, "sha256": STRING})), **GONE},
        security=JOB_TOKEN,
        extension=True,
        parameters=[*BUILD, query_param("driver", "docker or qemu"), query_param("name", "")],
    ),
    ("get", "/runner/builds/{id}/image/content"): op(
        "Download that image",
        {"200": {"description": "The content"}, **GONE},
        security=JOB_TOKEN,
        extension=True,
        parameters=[*BUILD, query_param("driver", "docker or qemu"), query_param("name", "")],
    ),
    ("get", "/runner/builds/{id}/cache"): op(
        "Download the build's cache entry (a tar)",
        {
            "200": {"description": "The tar"},
            "204": {"description": "Nothing saved yet"},
            **GONE,
        },
        security=JOB_TOKEN,
        extension=True,
        parameters=BUILD,
    ),
    ("put", "/runner/builds/{id}/cache"): op(
        "Save the build's cache entry (a tar, raw body)",
        {"200": json_response("Saved", obj({"size": INT, "evicted": STRINGS})), **GONE},
        security=JOB_TOKEN,
        extension=True,
        parameters=[*BUILD, query_param("paths", "JSON list of the paths in the tar")],
    ),
}
