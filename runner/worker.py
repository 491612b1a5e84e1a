"""`marid runner`: claims queued builds and executes them, up to `runner.parallelism` at once.

Runners sleep on LISTEN channels.BUILDS (a bounded poll is the fallback), hold a lease on each
build they run and renew it; any runner requeues builds whose lease expired (docs/manifest.md
§6.13). A kill request arrives by NOTIFY on channels.KILL and is also seen at each renewal.
Every transition of the build is marid/lifecycle.py's; this module runs the loop around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from marid import channels, keys, lifecycle, variables, webhooks
from marid.blobs import BlobStore
from marid.config import Config
from marid.crypto import Cipher
from marid.lifecycle import Claim, ClaimedBuild, LostLease
from marid.runner.drivers.base import Driver, Limits, SshKey
from marid.runner.drivers.os import OsDriver
from marid.runner.execute import BuildSpec, Execution, JobSpec, ObjectSpec, StageSpec
from marid.runner.reporter import DbReporter

log = logging.getLogger(__name__)
POLL = 5.0  # seconds between queue checks when no NOTIFY arrives


class Worker:
    def __init__(self, config: Config, pool: asyncpg.Pool, blobs: BlobStore) -> None:
        self.config = config
        self.pool = pool
        self.blobs = blobs
        self.cipher = Cipher(config.crypto.key)
        self.name = config.runner.name or f"{socket.gethostname()}-{os.getpid()}"
        # The driver types this server accepts that a runner can execute.
        self.drivers = [d for d in config.drivers if d in ("docker", "os")]
        self.running: dict[int, Execution] = {}
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.docker: Any = None  # docker.DockerClient, made on first use
        self.instance = instance_of(config.database.dsn)
        self.api_url = config.server.api_url  # for webhook payloads

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and execute builds until `stop` is set, then wait for running builds."""
        listener = await asyncpg.connect(self.config.database.dsn)
        await listener.add_listener(channels.BUILDS, lambda *_: self.wake.set())
        await listener.add_listener(channels.KILL, self._kill_notified)
        drivers, parallelism = ",".join(self.drivers), self.config.runner.parallelism
        log.info("runner %s: drivers %s, parallelism %d", self.name, drivers, parallelism)
        try:
            while not stop.is_set():
                await self._recover()
                await self._fill()
                self.wake.clear()
                waiters = [asyncio.ensure_future(e.wait()) for e in (self.wake, stop)]
                await asyncio.wait(waiters, timeout=POLL, return_when="FIRST_COMPLETED")
                for waiter in waiters:
                    waiter.cancel()
        finally:
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            await listener.close()
            if self.docker is not None:
                self.docker.close()

    def _kill_notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            execution = self.running.get(int(payload))
            if execution is not None:
                execution.kill.set()

    async def _recover(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            recovered = await lifecycle.recover_expired(conn)
            for build_id in recovered.killed:
                await webhooks.emit_build(conn, build_id, "build.finished", self.api_url)
        for build_id in recovered.build_ids:
            log.warning("build %d: its runner's lease expired; requeued", build_id)
        for key in recovered.stale_blobs:
            await self.blobs.delete(key)

    async def _fill(self) -> None:
        """Claim builds while there is capacity."""
        while len(self.tasks) < self.config.runner.parallelism:
            async with self.pool.acquire() as conn, conn.transaction():
                claim = await lifecycle.claim(
                    conn, self.name, self.drivers, self.config.runner.lease
                )
                if claim is None:
                    return
                await webhooks.emit_build(conn, claim.build_id, "build.started", self.api_url)
            task = asyncio.create_task(self._execute(claim))
            self.tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.wake.set()  # capacity freed: look at the queue again

    async def _execute(self, claim: Claim) -> None:
        log.info("build %d: attempt %d started", claim.build_id, claim.attempt)
        reporter = DbReporter(self.pool, self.blobs, claim, self.api_url)
        try:
            spec, driver = await self._load(claim)
            if claim.attempt > 1:
                await driver.clear_previous()  # a dead runner's containers may still run
            execution = Execution(spec, driver, reporter)
            self.running[claim.build_id] = execution
            heartbeat = asyncio.create_task(self._heartbeat(claim, execution))
            try:
                status = await execution.run()
            finally:
                heartbeat.cancel()
            await reporter.build_finished(status)
            log.info("build %d: %s", claim.build_id, status)
        except LostLease:
            log.warning("build %d: lease lost; attempt %d abandoned", claim.build_id, claim.attempt)
        except Exception:
            log.exception("build %d: runner error", claim.build_id)
        finally:
            self.running.pop(claim.build_id, None)

    async def _heartbeat(self, claim: Claim, execution: Execution) -> None:
        """Renew the lease; notice kill requests; give up when the lease is gone.

        The first renewal comes at once: a kill NOTIFY that arrived before the execution was
        in `self.running` (while the build was loaded) found nothing to kill, and the
        request must not wait a renewal period to be seen (docs/architecture.md).
        """
        lease = self.config.runner.lease
        while True:
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    killed = await lifecycle.renew(conn, claim, lease)
            except LostLease:
                log.warning("build %d: lease lost", claim.build_id)
                execution.kill.set()
                return
            if killed:
                execution.kill.set()
            await asyncio.sleep(min(1.0, lease / 3))

    async def _load(self, claim: Claim) -> tuple[BuildSpec, Driver]:
        """The claimed build as the engine runs it, masked values and keys decrypted."""
        async with self.pool.acquire() as conn:
            build = await lifecycle.load(conn, claim)
        env, secrets = self._environment(build)
        spec = BuildSpec(
            stages=[
                StageSpec(s.name, s.allow_failures, [_job_spec(job) for job in s.jobs])
                for s in build.stages
            ],
            env=env,
            secrets=secrets,
            objects=[
                ObjectSpec(o.source, o.destination, self._fetcher(o.blob_key), o.id)
                for o in build.objects
            ],
            keys=[
                SshKey(
                    k.name,
                    keys.decrypt_key(self.cipher, build.owner_id, k.name, k.sealed),
                    k.config,
                )
                for k in build.keys
            ],
            timeout=build.timeout,
            artifact_max_size=self.config.artifacts.max_size,
        )
        return spec, self._driver(build)

    def _environment(self, build: ClaimedBuild) -> tuple[dict[str, str], list[str]]:
        """The build's environment and the plaintexts of its masked values."""
        env: dict[str, str] = {}
        secrets: list[str] = []
        for var in build.variables:
            value = var.value
            if var.masked:
                assert var.sealed is not None
                value = variables.decrypt_value(self.cipher, build.owner_id, var.key, var.sealed)
                secrets.append(value)
            assert value is not None
            env[var.key] = value
        return env, secrets

    def _driver(self, build: ClaimedBuild) -> Driver:
        """The driver of the settings stored at submission (docs/manifest.md §9)."""
        resources = build.resources
        limits = Limits(resources.memory, resources.cpus, resources.pids)
        if build.driver == "os":
            return OsDriver(limits)
        from marid.runner.drivers import docker

        if self.docker is None:  # one client per runner: connecting costs a round trip
            self.docker = docker.docker_client(self.config.docker.host)
        return docker.DockerDriver(
            client=self.docker,
            build_id=build.claim.build_id,
            attempt=build.claim.attempt,
            image=build.driver_config["image"],
            workspace=build.driver_config["workspace"],
            limits=limits,
            network=self.config.docker.network,
            pull=self.config.docker.pull,
            uploaded=lambda name: self._uploaded_image(build, name),
            instance=self.instance,
        )

    async def _uploaded_image(self, build: ClaimedBuild, name: str) -> Any:
        from marid import images
        from marid.runner.drivers.docker import UploadedImage

        async with self.pool.acquire() as conn:
            found = await images.find_docker_image(conn, build.owner_id, build.namespace_id, name)
        if found is None:
            return None
        blob_key = found.blob_key

        async def fetch(path: Path) -> None:
            await self.blobs.copy_to_file(blob_key, path)

        return UploadedImage(digest=found.sha256, fetch=fetch)

    def _fetcher(self, blob_key: str | None) -> Callable[[Path], Awaitable[None]] | None:
        if blob_key is None:
            return None

        async def fetch(path: Path) -> None:
            await self.blobs.copy_to_file(blob_key, path)

        return fetch


def _job_spec(job: lifecycle.Job) -> JobSpec:
    return JobSpec(job.name, job.commands, job.timeout, job.artifacts, job.id)


def instance_of(dsn: str) -> str:
    """A stable name for the database this runner serves (host, port, database; never the
    password): containers are labelled with it, as installations may share a Docker engine."""
    parts = urlsplit(dsn)
    where = f"{parts.hostname}:{parts.port}{parts.path}"
    return hashlib.sha256(where.encode()).hexdigest()[:16]
