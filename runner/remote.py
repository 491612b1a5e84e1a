"""A runner on another machine (`marid runner --server URL --token TOKEN`, docs/runners.md): the
Backend that gets builds from the API's runner protocol (api/runner.py) instead of the
database. It holds no DSN and no crypto key: it knows the builds it claims, with their secrets,
and nothing else.

It registers with its enrolment token at start (a runner token given instead is used as it
is), says it is alive every third of a lease, long-polls for builds while it has capacity,
and stops when it is revoked. Each claimed build comes with a job token that every request
about it carries. The API answers 404 once the attempt has ended (LostLease here), 401 to a
revoked or unknown runner, and 503 while its database is away; a request that gets no answer
or a 5xx raises ServerAway, an OSError, which the worker and the reporter retry for as long
as the lease lasts, as they retry an in-process runner's database outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from marid import __version__, plans
from marid.config import Config
from marid.lifecycle import KeptWorkspace, LostLease
from marid.output import Written
from marid.runner import reaper
from marid.runner.backend import Assignment, Backend, Fetch, Presence, RunnerRevoked
from marid.runner.caches import CacheStore, Found, Saved
from marid.runner.drivers.base import DriverError
from marid.runner.execute import ArtifactError, JobSpec, ObjectSpec
from marid.runner.reporter import (
    FLUSH_DELAY,
    BufferedReporter,
    Lease,
    Reporting,
    log_failure,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)
CLAIM_WAIT = 30.0  # seconds one claim waits at the API for a build (its long poll)
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = CLAIM_WAIT + 30.0  # seconds without a byte from the API before giving up
WITHDRAW_TIMEOUT = 5.0
RETRY_FIRST, RETRY_MAX = 0.5, 30.0
CHUNK_SIZE = 256 * 1024
OUTPUT_BATCH = 256 * 1024  # bytes of JSON-encoded output text in one request, at most
MAX_EVENTS = 1000  # events in one request, at most (api/runner.py)
REDIRECTS = (302, 303, 307)  # a download sent to a presigned URL (docs/runners.md §6)


class ServerAway(OSError):
    """The API could not be reached, or answered 5xx (its database away, say)."""


class Refused(Exception):
    """The API answered 401 to the runner token."""

    def __init__(self, message: str, revoked: bool) -> None:
        super().__init__(message)
        self.revoked = revoked


class Gone(Exception):
    """The API answered 404."""


class Rejected(Exception):
    """The API refused the request as malformed (400) or too large (413): a bug, or a limit."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Api:
    """JSON over HTTP to the API's base URL, with the errors above."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
        self.session = aiohttp.ClientSession(timeout=timeout, raise_for_status=False)

    async def close(self) -> None:
        await self.session.close()

    @contextlib.asynccontextmanager
    async def request(
        self, method: str, path: str, token: str, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The response to a request, once its status says it worked (2xx)."""
        headers = {"Authorization": f"Bearer {token}", "User-Agent": f"marid-runner/{__version__}"}
        try:
            async with self.session.request(
                method, self.url + path, headers=headers, **kwargs
            ) as response:
                if response.status >= 300 and response.status not in REDIRECTS:
                    await _raise_for(response)
                yield response
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServerAway(f"the server did not answer ({_reason(exc)})") from exc

    @contextlib.asynccontextmanager
    async def download(
        self, path: str, token: str, params: dict[str, str] | None = None
    ) -> AsyncIterator[tuple[aiohttp.ClientResponse, Any]]:
        """A GET of content: the API's response, or the one of the presigned URL it redirects
        to (an S3 blob store), fetched without the token; with the API's headers."""
        location = None
        async with self.request(
            "GET", path, token, params=params, allow_redirects=False
        ) as response:
            if response.status not in REDIRECTS:
                yield response, response.headers
                return
            location, headers = response.headers.get("Location", ""), response.headers.copy()
        try:
            async with self.session.get(location, allow_redirects=False) as direct:
                if direct.status != 200:
                    raise ServerAway(f"the blob store answered {direct.status}")
                yield direct, headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServerAway(f"the blob store did not answer ({_reason(exc)})") from exc

    async def call(self, method: str, path: str, token: str, body: Any = None) -> Any:
        """The JSON answer (None for 204) to a JSON request."""
        async with self.request(method, path, token, json=body) as response:
            if response.status == 204:
                return None
            return await response.json()


async def _raise_for(response: aiohttp.ClientResponse) -> None:
    try:
        body = await response.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    text = message or json.dumps(body) or response.reason or str(response.status)
    if response.status >= 500:
        raise ServerAway(f"the server answered {response.status}: {text}")
    if response.status == 401:
        raise Refused(str(text), bool(isinstance(body, dict) and body.get("revoked")))
    if response.status == 404:
        raise Gone(str(text))
    raise Rejected(str(text), response.status)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class HttpBackend(Backend):
    def __init__(self, config: Config, url: str, token: str) -> None:
        self.config = config
        self.api = Api(url)
        self.enrolment = token if not token.startswith("mrr_") else None
        self.token = token if token.startswith("mrr_") else ""
        self.instance = ""  # the API tells it at registration
        self.server = "server"
        self.renew_at_once = False
        self.revoked = False
        self.stop: asyncio.Event | None = None

    async def _register(self, presence: Presence) -> None:
        """Register with the enrolment token (a runner token given was registered already)."""
        if self.enrolment is None:
            answer = await self.api.call("POST", "/runner/heartbeat", self.token, _said(presence))
            self.instance = self.instance or _instance_of(self.api.url)
            log.info("runner %s: using its runner token (id %s)", presence.name, answer["id"])
            return
        answer = await self.api.call("POST", "/runner/register", self.enrolment, _said(presence))
        self.token, self.instance = answer["token"], answer["instance"]
        log.info("runner %s: registered with %s (id %d)", presence.name, self.api.url, answer["id"])

    async def _connect(self, presence: Presence, stop: asyncio.Event) -> bool:
        """Register, retrying while the API is away; False when stopped meanwhile."""
        pause = RETRY_FIRST
        warned = False
        while not stop.is_set():
            try:
                await self._register(presence)
                return True
            except ServerAway as exc:
                if not warned:
                    log.warning("runner %s: %s; retrying", presence.name, exc)
                    warned = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            pause = min(pause * 2, RETRY_MAX)
        return False

    @contextlib.asynccontextmanager
    async def beside(
        self,
        presence: Presence,
        stop: asyncio.Event,
        wake: Callable[[], None],
        kill: Callable[[int], None],
    ) -> AsyncIterator[None]:
        self.stop = stop
        try:
            if not await self._connect(presence, stop):
                yield
                return
        except Refused as exc:
            raise RunnerRevoked(f"the server refused the token: {exc}") from exc
        tasks = [
            asyncio.create_task(self._heartbeats(presence, stop, wake), name="runner heartbeat"),
            asyncio.create_task(
                reaper.run(self.config, None, None, self.instance, stop, facts=self._facts),
                name="runner reaper",
            ),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not self.revoked:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(WITHDRAW_TIMEOUT):
                        await self.api.call("DELETE", "/runner/session", self.token)
            await self.api.close()

    async def _heartbeats(
        self, presence: Presence, stop: asyncio.Event, wake: Callable[[], None]
    ) -> None:
        """Say the runner is alive every presence.interval; a revoked runner stops claiming
        (its builds were handed back: their jobs stop at their next renewal). A token the API
        forgot (the runner was away for an hour) is replaced by registering again."""
        failing = False
        while not stop.is_set():
            try:
                await self.api.call("POST", "/runner/heartbeat", self.token, _said(presence))
                if failing:
                    log.info("runner %s: the server answers again", presence.name)
                failing = False
            except Refused as exc:
                if exc.revoked or self.enrolment is None:
                    log.error("runner %s: %s; stopping", presence.name, exc)
                    self.revoked = True
                    wake()
                    return
                log.warning("runner %s: %s; registering again", presence.name, exc)
                with contextlib.suppress(Exception):
                    await self._register(presence)
            except Exception as exc:
                if not failing:
                    log.warning("runner %s: heartbeat failed: %s", presence.name, exc)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), presence.interval)

    async def _facts(self, builds: list[int], places: list[str]) -> reaper.Facts:
        answer = await self.api.call(
            "POST", "/runner/sweep", self.token, {"builds": builds, "places": places}
        )
        return reaper.Facts(
            {(b, a) for b, a in answer["live"]},
            float(answer["longest_timeout"]),
            {p: (set(k["kept"]), set(k["expired"])) for p, k in answer["kept"].items()},
        )

    async def tend(self) -> None:
        if self.revoked:
            raise RunnerRevoked("this runner was revoked")

    async def claim(self, presence: Presence) -> Assignment | None:
        """A build claimed through the long poll, or None when none came or the runner is
        stopping (a claim the API makes as the request is given up is recovered when its
        lease expires)."""
        body = {"wait": CLAIM_WAIT, "lease": self.config.runner.lease}
        asking = asyncio.ensure_future(self.api.call("POST", "/runner/claim", self.token, body))
        stopping = asyncio.ensure_future((self.stop or asyncio.Event()).wait())
        try:
            await asyncio.wait({asking, stopping}, return_when="FIRST_COMPLETED")
        finally:
            stopping.cancel()
        if not asking.done():
            asking.cancel()
            with contextlib.suppress(BaseException):
                await asking
            return None
        try:
            answer = asking.result()
        except Refused as exc:
            self.revoked = True
            raise RunnerRevoked(str(exc)) from exc
        if answer is None:
            return None
        plan = plans.from_json(answer["plan"])
        return HttpAssignment(self, plan, answer["job_token"])

    async def idle(self, presence: Presence) -> float:
        return 0.0  # the claim itself waited at the API


def _said(presence: Presence) -> dict[str, Any]:
    return {
        "name": presence.name,
        "version": __version__,
        "hostname": socket.gethostname(),
        "drivers": presence.drivers,
        "labels": presence.labels,
        "parallelism": presence.parallelism,
        "places": presence.places(),
        "max_running_per_user": presence.author_limit,
        "interval": presence.interval,
    }


def _instance_of(url: str) -> str:
    """A runner token given on the command line skips registration, which tells the
    installation's label: the label is then the API's URL's (runners.instance_of)."""
    from marid import runners

    return runners.instance_of(url)


class HttpAssignment(Assignment):
    def __init__(self, backend: HttpBackend, plan: plans.Plan, token: str) -> None:
        self.api = backend.api
        self._plan = plan
        self.token = token
        self.claim = plan.claim
        self.base = f"/runner/builds/{plan.build_id}"

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            return await self.api.call(method, self.base + path, self.token, body)
        except Gone as exc:
            raise LostLease(f"build {self.claim.build_id}: the server says {exc}") from exc

    async def plan(self) -> plans.Plan:
        return self._plan

    def reporter(self, lease: Lease, plan: plans.Plan) -> Reporting:
        return HttpReporter(self, lease, plan.settings.max_output)

    async def renew(self, lease: float) -> bool:
        answer = await self.call("POST", "/renew", {"lease": lease})
        return bool(answer["kill"])

    async def attempt_failed(self, reason: str, delay: float) -> None:
        await self.call("POST", "/fail", {"reason": reason[:2000], "delay": delay})
        log.warning(
            "build %d: attempt %d failed (%s); handed back",
            self.claim.build_id,
            self.claim.attempt,
            reason,
        )

    async def download(self, path: str, destination: Path, **params: str) -> None:
        """Stream the content at `path` to the local file `destination`."""
        async with self.api.download(self.base + path, self.token, params or None) as (got, _):
            await _save(got, destination)

    async def fetch_object(self, obj: plans.Object, path: Path) -> None:
        from marid.blobs import BlobNotFound

        try:
            await self.download(f"/objects/{obj.id}", path)
        except Gone:  # the object is gone (or the attempt: the next write says so)
            raise BlobNotFound(obj.source) from None

    async def _upload(self, driver: str, name: str) -> tuple[str, Fetch] | None:
        try:
            found = await self.call("GET", f"/image?driver={driver}&name={_quote(name)}")
        except LostLease:
            return None

        async def fetch(path: Path) -> None:
            try:
                await self.download("/image/content", path, driver=driver, name=name)
            except Gone:
                raise DriverError(f"image {name}: no such image") from None

        return str(found["sha256"]), fetch

    def cache_store(self) -> CacheStore:
        return HttpCaches(self)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


async def _save(response: aiohttp.ClientResponse, destination: Path) -> None:
    def write_all(chunks: list[bytes], mode: str) -> None:
        with destination.open(mode) as out:
            for chunk in chunks:
                out.write(chunk)

    mode = "wb"
    batch: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(CHUNK_SIZE):
        batch.append(chunk)
        size += len(chunk)
        if size >= 4 * CHUNK_SIZE:
            await asyncio.to_thread(write_all, batch, mode)
            batch, size, mode = [], 0, "ab"
    await asyncio.to_thread(write_all, batch, mode)


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as source:
        while chunk := await asyncio.to_thread(source.read, CHUNK_SIZE):
            yield chunk


class HttpCaches:
    """The build's cache scope, through the API."""

    def __init__(self, assignment: HttpAssignment) -> None:
        self.assignment = assignment

    async def fetch(self, destination: Path) -> Found | None:
        a = self.assignment
        try:
            async with a.api.download(a.base + "/cache", a.token) as (response, headers):
                if response.status == 204:
                    return None
                paths = json.loads(headers.get("X-Marid-Cache-Paths", "[]"))
                number = headers.get("X-Marid-Cache-Build", "")
                await _save(response, destination)
        except Gone as exc:
            raise LostLease(str(exc)) from exc
        size = (await asyncio.to_thread(destination.stat)).st_size
        return Found(paths, size, int(number) if number.isdigit() else None)

    async def save(self, archive: Path, paths: list[str]) -> Saved:
        a = self.assignment
        try:
            async with a.api.request(
                "PUT",
                a.base + "/cache",
                a.token,
                params={"paths": json.dumps(paths)},
                data=_file_chunks(archive),
            ) as response:
                answer = await response.json()
        except Gone as exc:
            raise LostLease(str(exc)) from exc
        except Rejected as exc:
            raise DriverError(str(exc)) from exc
        return Saved(int(answer["size"]), list(answer["evicted"]))


class HttpReporter(BufferedReporter):
    """The reporter of a runner on another machine. Events are queued and sent together, in
    order, in one request (`POST …/events`): within FLUSH_DELAY of the first, or at once when
    the build ends or an artifact is uploaded; a request is tried again while the API is away
    and the lease lasts. A trivial build so costs its claim and one request."""

    def __init__(self, assignment: HttpAssignment, lease: Lease, max_output: int) -> None:
        super().__init__(assignment.claim, lease, max_output)
        self.assignment = assignment
        self.queue: list[dict[str, Any]] = []
        self.sending = asyncio.Lock()
        self.timer: asyncio.TimerHandle | None = None

    def _queue(self, event: dict[str, Any], timed: bool = False) -> None:
        """Queue `event`; a `timed` one (a job's start or end) says how long before its
        request it happened (`ago`), so that the API records when, not when it heard."""
        if timed:
            event["ago"] = time.monotonic()  # made relative when sent
        self.queue.append(event)
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(FLUSH_DELAY, self._send_later)

    def _send_later(self) -> None:
        self.timer = None
        task = asyncio.ensure_future(self.flush())
        task.add_done_callback(log_failure)

    async def flush(self) -> None:
        """Buffered output into the queue, then the queue sent."""
        await self._place()
        async with self.sending:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            events, self.queue = self.queue, []
            now = time.monotonic()
            for event in events:
                if "ago" in event:
                    event["ago"] = round(max(0.0, now - event["ago"]), 3)
            for batch in _batches(events):
                await self._retry(
                    lambda batch=batch: self.assignment.call(  # type: ignore[misc]
                        "POST", "/events", {"events": batch}
                    )
                )

    async def job_started(self, job: JobSpec) -> None:
        self._queue({"type": "start", "job": _job_id(job)}, timed=True)

    async def _append(
        self, job_id: int, chunks: list[tuple[int, str]], forget: tuple[int, int] | None
    ) -> None:
        self.queue.append(
            {"type": "output", "job": job_id, "chunks": chunks, "forget": forget and list(forget)}
        )

    async def _finish_job(
        self, job_id: int, status: str, ran: bool, written: Written | None
    ) -> None:
        self._queue(
            {
                "type": "finish",
                "job": job_id,
                "status": status,
                "ran": ran,
                "written": dataclasses.asdict(written) if written else None,
            },
            timed=True,
        )

    async def object_placed(self, obj: ObjectSpec) -> None:
        self._queue({"type": "object", "object": obj.id})

    async def key_placed(self, name: str, location: str) -> None:
        self._queue({"type": "key", "name": name, "location": location})

    async def artifact_collected(self, job: JobSpec, source: str, name: str, path: Path) -> None:
        await self.flush()  # what came before, first
        a = self.assignment

        async def upload() -> None:
            async with a.api.request(
                "PUT",
                f"{a.base}/jobs/{_job_id(job)}/artifacts",
                a.token,
                params={"source": source, "name": name},
                data=_file_chunks(path),
            ):
                pass

        try:
            await self._retry(upload)
        except Gone as exc:
            raise LostLease(str(exc)) from exc
        except Rejected as exc:
            raise ArtifactError(str(exc)) from exc

    async def build_finished(
        self, status: str, kept: KeptWorkspace | None = None, keep_for: float = 0.0
    ) -> None:
        """The build ends, with what is still queued; the API keeps `kept` for its own
        builds.keep_workspace."""
        where = None
        if kept is not None:
            where = {"driver": kept.driver, "place": kept.place, "location": kept.location}
        self.queue.append({"type": "end", "status": status, "kept": where})
        await self.flush()


def _batches(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """`events` in requests of at most MAX_EVENTS events and OUTPUT_BATCH bytes of JSON each
    (one event may be alone in a larger one: an output event holds chunks of at most 32 KiB of
    text)."""
    batches: list[list[dict[str, Any]]] = []
    size = OUTPUT_BATCH
    for event in events:
        cost = len(json.dumps(event))
        if size + cost > OUTPUT_BATCH or len(batches[-1]) >= MAX_EVENTS:
            batches.append([])
            size = 0
        batches[-1].append(event)
        size += cost
    return batches


def _job_id(job: JobSpec) -> int:
    assert job.id is not None  # a claimed build's jobs are rows
    return job.id
