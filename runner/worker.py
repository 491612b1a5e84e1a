"""`marid runner`: claims queued builds and executes them, up to `runner.parallelism` at once.

Runners sleep on LISTEN marid_builds (a bounded poll is the fallback), hold a lease on each
build they run and renew it; any runner requeues builds whose lease expired (docs/manifest.md
§6.13). A kill request arrives by NOTIFY marid_kill and is also seen at each renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from marid import keys, queue, variables, webhooks
from marid.blobs import BlobStore
from marid.config import Config
from marid.crypto import Cipher
from marid.queue import Claim
from marid.runner.drivers.base import Driver, Limits, SshKey
from marid.runner.drivers.os import OsDriver
from marid.runner.execute import BuildSpec, Execution, JobSpec, ObjectSpec, StageSpec
from marid.runner.reporter import DbReporter, LostLease, artifacts_of

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
        await listener.add_listener(queue.QUEUE_CHANNEL, lambda *_: self.wake.set())
        await listener.add_listener(queue.KILL_CHANNEL, self._kill_notified)
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
            recovered = await queue.recover_expired(conn)
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
                claim = await queue.claim(conn, self.name, self.drivers, self.config.runner.lease)
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
            async with self.pool.acquire() as conn:
                killed = await queue.renew(conn, claim, lease)
            if killed is None:
                log.warning("build %d: lease lost", claim.build_id)
                execution.kill.set()
                return
            if killed:
                execution.kill.set()
            await asyncio.sleep(min(1.0, lease / 3))

    async def _load(self, claim: Claim) -> tuple[BuildSpec, Driver]:
        async with self.pool.acquire() as conn:
            build = await conn.fetchrow(
                "SELECT user_id, driver, manifest, timeout_seconds, resources FROM builds"
                " WHERE id = $1",
                claim.build_id,
            )
            env, secrets = await self._variables(conn, claim.build_id, build["user_id"])
            spec = BuildSpec(
                stages=await self._stages(conn, claim.build_id),
                env=env,
                secrets=secrets,
                objects=await self._objects(conn, claim.build_id),
                keys=await self._keys(conn, claim.build_id, build["user_id"]),
                timeout=build["timeout_seconds"],
                artifact_max_size=self.config.artifacts.max_size,
            )
        resources = json.loads(build["resources"])
        limits = Limits(resources["memory"], resources["cpus"], resources["pids"])
        return spec, self._driver(claim, build["driver"], build["manifest"], limits)

    def _driver(self, claim: Claim, kind: str, manifest_text: str, limits: Limits) -> Driver:
        if kind == "os":
            return OsDriver(limits)
        from marid import manifest
        from marid.runner.drivers import docker

        config = manifest.parse(manifest_text).driver.config
        if self.docker is None:  # one client per runner: connecting costs a round trip
            self.docker = docker.docker_client(self.config.docker.host)
        return docker.DockerDriver(
            client=self.docker,
            build_id=claim.build_id,
            attempt=claim.attempt,
            image=config["image"],
            workspace=config["workspace"],
            limits=limits,
            network=self.config.docker.network,
            pull=self.config.docker.pull,
            uploaded=lambda name: self._uploaded_image(claim.build_id, name),
            instance=self.instance,
        )

    async def _uploaded_image(self, build_id: int, name: str) -> Any:
        from marid import images
        from marid.runner.drivers.docker import UploadedImage

        async with self.pool.acquire() as conn:
            build = await conn.fetchrow(
                "SELECT user_id, namespace_id FROM builds WHERE id = $1", build_id
            )
            found = await images.find_docker_image(
                conn, build["user_id"], build["namespace_id"], name
            )
        if found is None:
            return None
        blob_key = found.blob_key

        async def fetch(path: Path) -> None:
            await self.blobs.copy_to_file(blob_key, path)

        return UploadedImage(digest=found.sha256, fetch=fetch)

    async def _stages(self, conn: asyncpg.Connection, build_id: int) -> list[StageSpec]:
        rows = await conn.fetch(
            """
            SELECT s.name AS stage, s.allow_failures, j.id, j.name, j.commands,
                   j.timeout_seconds, j.artifacts
            FROM build_stages s JOIN build_jobs j ON j.stage_id = s.id
            WHERE s.build_id = $1 ORDER BY s.position, j.position
            """,
            build_id,
        )
        stages: dict[str, StageSpec] = {}
        for row in rows:
            stage = stages.setdefault(
                row["stage"], StageSpec(row["stage"], row["allow_failures"], [])
            )
            stage.jobs.append(
                JobSpec(
                    row["name"],
                    row["commands"],
                    row["timeout_seconds"],
                    artifacts_of(row["artifacts"]),
                    row["id"],
                )
            )
        return list(stages.values())

    async def _variables(
        self, conn: asyncpg.Connection, build_id: int, owner_id: int
    ) -> tuple[dict[str, str], list[str]]:
        """The build's environment and the plaintexts of its masked values."""
        rows = await conn.fetch(
            "SELECT key, value, value_sealed, masked FROM build_variables"
            " WHERE build_id = $1 ORDER BY position",
            build_id,
        )
        env: dict[str, str] = {}
        secrets: list[str] = []
        for row in rows:
            value = row["value"]
            if row["masked"]:
                sealed = row["value_sealed"]
                value = variables.decrypt_value(self.cipher, owner_id, row["key"], sealed)
                secrets.append(value)
            env[row["key"]] = value
        return env, secrets

    async def _keys(self, conn: asyncpg.Connection, build_id: int, owner_id: int) -> list[SshKey]:
        rows = await conn.fetch(
            "SELECT name, key_sealed, config FROM build_keys WHERE build_id = $1 ORDER BY name",
            build_id,
        )
        return [
            SshKey(
                row["name"],
                keys.decrypt_key(self.cipher, owner_id, row["name"], row["key_sealed"]),
                row["config"],
            )
            for row in rows
        ]

    async def _objects(self, conn: asyncpg.Connection, build_id: int) -> list[ObjectSpec]:
        rows = await conn.fetch(
            """
            SELECT bo.id, bo.source, bo.name, o.blob_key
            FROM build_objects bo LEFT JOIN objects o ON o.id = bo.object_id
            WHERE bo.build_id = $1 ORDER BY bo.id
            """,
            build_id,
        )
        return [
            ObjectSpec(row["source"], row["name"], self._fetcher(row["blob_key"]), row["id"])
            for row in rows
        ]

    def _fetcher(self, blob_key: str | None) -> Callable[[Path], Awaitable[None]] | None:
        if blob_key is None:
            return None

        async def fetch(path: Path) -> None:
            await self.blobs.copy_to_file(blob_key, path)

        return fetch


def instance_of(dsn: str) -> str:
    """A stable name for the database this runner serves (host, port, database; never the
    password): containers are labelled with it, as installations may share a Docker engine."""
    parts = urlsplit(dsn)
    where = f"{parts.hostname}:{parts.port}{parts.path}"
    return hashlib.sha256(where.encode()).hexdigest()[:16]
