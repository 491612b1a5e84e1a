"""Where a runner gets its builds and sends what they do: the database itself (`DbBackend`, for
an in-process runner: `marid up`, `marid runner` with a DSN) or the API over HTTP (the
`HttpBackend` of runner/remote.py: a runner on another machine with no DSN and no crypto key,
docs/runners.md).

runner/worker.py runs the same loop, heartbeat, drivers and engine over either: it asks the
Backend for a claimed build (an Assignment) and the Assignment for everything about that build
(its plan, its lease, its objects, images and cache, and the reporter its events go to). Both
raise LostLease once the attempt no longer holds its build, and an OSError (or another of
marid.listen.UNAVAILABLE) while the server cannot be reached, which the worker retries for as
long as the lease lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from marid import caches, channels, images, lifecycle, plans, runners, webhooks
from marid.blobs import BlobNotFound, BlobStore
from marid.config import Config
from marid.crypto import Cipher
from marid.lifecycle import Claim
from marid.listen import Listener
from marid.runner import reaper
from marid.runner.caches import CacheStore, ServerCaches
from marid.runner.drivers.base import DriverError
from marid.runner.execute import InfrastructureError, describe
from marid.runner.reporter import DbReporter, Lease, Reporting

if TYPE_CHECKING:
    from marid.runner.drivers.docker import UploadedImage
    from marid.runner.drivers.qemu import Upload

log = logging.getLogger(__name__)
Fetch = Callable[[Path], Awaitable[None]]  # writes content to a local file
POLL = 5.0  # seconds between queue checks when no NOTIFY arrives


class RunnerRevoked(Exception):
    """The server no longer accepts this runner (an administrator revoked it): it stops."""


class Presence:
    """What a runner says of itself (marid/runners.py announce, marid/remote.py Announcement)."""

    def __init__(
        self,
        name: str,
        drivers: list[str],
        parallelism: int,
        interval: float,
        author_limit: int | None,
        places: Callable[[], list[str]],
        labels: list[str],
    ) -> None:
        self.name = name
        self.drivers = drivers
        self.parallelism = parallelism
        self.interval = interval
        self.author_limit = author_limit
        self.places = places  # read at each announcement: the engine's ID comes late
        self.labels = labels


class Assignment(ABC):
    """One claimed attempt of a build."""

    claim: Claim

    @abstractmethod
    async def plan(self) -> plans.Plan:
        """The build to run; InfrastructureError-worthy failures raise (a new attempt)."""

    @abstractmethod
    def reporter(self, lease: Lease, plan: plans.Plan) -> Reporting:
        """Where the execution's events go."""

    @abstractmethod
    async def renew(self, lease: float) -> bool:
        """Extend the lease; returns whether a kill was asked. LostLease once it is gone."""

    @abstractmethod
    async def attempt_failed(self, reason: str, delay: float) -> None:
        """Hand the build back for a new attempt after `delay` seconds (or end it `failed` on
        its last). LostLease when the attempt had ended meanwhile."""

    @abstractmethod
    async def fetch_object(self, obj: plans.Object, path: Path) -> None:
        """Write the stored object's content to `path`; BlobNotFound when it is gone."""

    @abstractmethod
    async def _upload(self, driver: str, name: str) -> tuple[str, Fetch] | None:
        """The SHA-256 and a fetcher of the upload of `driver` named `name` the build may use
        (docs/manifest.md §9.2 step 1), else None."""

    async def docker_image(self, name: str) -> UploadedImage | None:
        """The uploaded `docker save` archive named `name` the build may use, else None."""
        from marid.runner.drivers.docker import UploadedImage

        found = await self._upload("docker", name)
        return None if found is None else UploadedImage(*found)

    async def qemu_upload(self, name: str) -> Upload | None:
        """The uploaded QCOW2 image named `name` the build may use, else None."""
        from marid.runner.drivers.qemu import Upload

        found = await self._upload("qemu", name)
        return None if found is None else Upload(*found)

    @abstractmethod
    def cache_store(self) -> CacheStore:
        """The build's cache entries (the plan has a `cache`)."""


class Backend(ABC):
    instance: str  # this installation's label on the containers its runners make
    server: str  # what the runner talks to, in messages: "database", "server"
    # Whether a claimed build's lease is renewed at once (runner/worker.py _heartbeat): a kill
    # NOTIFY may have come before the build ran. Over HTTP a kill is only ever learnt from a
    # renewal, so the first comes after one period, like every other.
    renew_at_once = True

    @abstractmethod
    def beside(
        self,
        presence: Presence,
        stop: asyncio.Event,
        wake: Callable[[], None],
        kill: Callable[[int], None],
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Run what works beside the loop (presence, wake-ups, the reaper) while the block
        runs. `wake` is called when the queue may have work, `kill` with a build whose kill was
        asked."""

    @abstractmethod
    async def tend(self) -> None:
        """Each round of the loop, before claiming: requeue the builds whose runner's lease
        expired (the API does it for runners on other machines)."""

    @abstractmethod
    async def claim(self, presence: Presence) -> Assignment | None:
        """A claimed build, or None when there is none to take now."""

    @abstractmethod
    async def idle(self, presence: Presence) -> float:
        """Seconds the loop may sleep, unless woken, before it asks for a build again."""


class DbBackend(Backend):
    """The database itself: PostgreSQL's queue, LISTEN/NOTIFY and the blob store."""

    def __init__(self, config: Config, pool: asyncpg.Pool, blobs: BlobStore, instance: str):
        self.config = config
        self.pool = pool
        self.blobs = blobs
        self.cipher = Cipher(config.crypto.key)
        self.instance = instance
        self.server = "database"
        self.listener: Listener | None = None

    @contextlib.asynccontextmanager
    async def beside(
        self,
        presence: Presence,
        stop: asyncio.Event,
        wake: Callable[[], None],
        kill: Callable[[int], None],
    ) -> AsyncIterator[None]:
        def killed(payload: str) -> None:
            with contextlib.suppress(ValueError):
                kill(int(payload))

        self.listener = Listener(
            self.config.database.dsn,
            channels.BUILDS,
            lambda _: wake(),
            wake,  # (re)connected: what was notified meanwhile is only in the table
            others={channels.KILL: killed},
        )
        tasks = [
            asyncio.create_task(self.listener.run(), name="runner LISTEN"),
            asyncio.create_task(
                reaper.run(self.config, self.pool, self.blobs, self.instance, stop),
                name="runner reaper",
            ),
        ]
        presence_task = asyncio.create_task(
            runners.run(
                self.pool,
                presence.name,
                presence.drivers,
                presence.parallelism,
                stop,
                presence.interval,
                presence.author_limit,
                presence.places(),
            ),
            name="runner presence",
        )
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if not stop.is_set():  # else it is withdrawing, which a cancel would interrupt
                presence_task.cancel()
            await asyncio.gather(*tasks, presence_task, return_exceptions=True)

    async def claim(self, presence: Presence) -> Assignment | None:
        async with self.pool.acquire() as conn, conn.transaction():
            claim = await lifecycle.claim(
                conn,
                presence.name,
                presence.drivers,
                self.config.runner.lease,
                presence.author_limit,
                presence.places(),
            )
            if claim is None:
                return None
            await webhooks.emit_build(
                conn, claim.build_id, "build.started", self.config.server.api_url
            )
        return DbAssignment(self, claim)

    async def tend(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            recovered = await lifecycle.recover_expired(conn, self.config.runner.max_attempts)
            for build_id in [*recovered.killed, *recovered.failed]:
                await webhooks.emit_build(
                    conn, build_id, "build.finished", self.config.server.api_url
                )
        for build_id in recovered.build_ids:
            log.warning("build %d: its runner's lease expired; requeued", build_id)
        for build_id in recovered.failed:
            log.warning("build %d: its runner's lease expired on its last attempt", build_id)
        for key in recovered.stale_blobs:
            await self.blobs.delete(key)

    async def idle(self, presence: Presence) -> float:
        async with self.pool.acquire() as conn:
            due = await lifecycle.next_retry(conn, presence.drivers)
        wait = POLL if due is None else min(POLL, due + 0.01)
        # A NOTIFY missed while the LISTEN connection was down must not cost a whole POLL.
        return self.listener.deaf_wait(wait) if self.listener is not None else wait


class DbAssignment(Assignment):
    def __init__(self, backend: DbBackend, claim: Claim) -> None:
        self.backend = backend
        self.pool = backend.pool
        self.blobs = backend.blobs
        self.claim = claim
        self.build: lifecycle.ClaimedBuild | None = None
        self.found: caches.BuildCache | None = None

    async def plan(self) -> plans.Plan:
        async with self.pool.acquire() as conn:
            plan, self.build, self.found = await plans.make(
                conn, self.claim, self.backend.cipher, self.backend.config
            )
        return plan

    def reporter(self, lease: Lease, plan: plans.Plan) -> Reporting:
        api_url = self.backend.config.server.api_url
        max_output = plan.settings.max_output
        return DbReporter(self.pool, self.blobs, self.claim, api_url, lease, max_output)

    async def renew(self, lease: float) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            return await lifecycle.renew(conn, self.claim, lease)

    async def attempt_failed(self, reason: str, delay: float) -> None:
        config = self.backend.config
        async with self.pool.acquire() as conn, conn.transaction():
            over = await lifecycle.attempt_failed(
                conn, self.claim, reason, config.runner.max_attempts, delay
            )
            if not over.retried:
                await webhooks.emit_build(
                    conn, self.claim.build_id, "build.finished", config.server.api_url
                )
        log.warning(
            "build %d: attempt %d failed (%s); %s",
            self.claim.build_id,
            self.claim.attempt,
            reason,
            "retried" if over.retried else "ended",
        )
        for key in over.stale_blobs:
            with contextlib.suppress(Exception):  # else the API's reaper removes it later
                await self.blobs.delete(key)

    async def fetch_object(self, obj: plans.Object, path: Path) -> None:
        assert self.build is not None
        blob_key = next(o.blob_key for o in self.build.objects if o.id == obj.id)
        if blob_key is None:
            raise BlobNotFound(obj.source)
        await self.blobs.copy_to_file(blob_key, path)

    async def _upload(self, driver: str, name: str) -> tuple[str, Fetch] | None:
        assert self.build is not None
        async with self.pool.acquire() as conn:
            found = await images.find_upload(
                conn, driver, self.build.owner_id, self.build.namespace_id, name
            )
        if found is None:
            return None
        blob_key = found.blob_key

        async def fetch(path: Path) -> None:
            try:
                await self.blobs.copy_to_file(blob_key, path)
            except BlobNotFound:  # deleted since it was found
                raise DriverError(f"image {name}: no such image") from None

        return found.sha256, fetch

    def cache_store(self) -> CacheStore:
        assert self.found is not None
        return ServerCaches(
            self.pool,
            self.blobs,
            self.claim.build_id,
            self.found,
            self.backend.config.caches.max_total,
        )


def object_fetcher(assignment: Assignment, obj: plans.Object) -> Callable[[Path], Any] | None:
    """How the engine fetches `obj` (runner/execute.py ObjectSpec.fetch), or None when the
    stored object is gone."""
    if not obj.stored:
        return None

    async def fetch(path: Path) -> None:
        try:
            await assignment.fetch_object(obj, path)
        except BlobNotFound:
            raise DriverError(f"{obj.source}: no such object") from None  # the user's (§6.4)
        except Exception as exc:  # the blob store's or the server's: a new attempt
            raise InfrastructureError(f"fetching object {obj.source}: {describe(exc)}") from exc

    return fetch
