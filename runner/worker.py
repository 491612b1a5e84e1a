"""`marid runner`: claims queued builds and executes them, up to `runner.parallelism` at once.

Runners sleep on LISTEN channels.BUILDS (a bounded poll is the fallback; the connection is
marid/listen.py's, which reconnects after an outage and wakes the loop), hold a lease on each
build they run and renew it; any runner requeues builds whose lease expired (docs/manifest.md
§6.13). A kill request arrives by NOTIFY on channels.KILL and is also seen at each renewal, so
one asked while the runner was away reaches the job at the next renewal.

Nothing transient ends the runner: the loop retries with capped backoff and logs an outage once
(a warning, then a line when it ends); the heartbeat retries renewals until the lease is about
to run out, then stops the job itself so that a recovered build never has two runners. An
attempt that fails outside the user's commands is retried as a new attempt, up to
`runner.max_attempts` (marid/lifecycle.py `attempt_failed`). The runner's reaper
(runner/reaper.py) runs beside the loop. Every transition of the build is marid/lifecycle.py's;
this module runs the loop around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from typing import Any, cast

import asyncpg

from marid import lifecycle, plans, runners
from marid.blobs import BlobStore
from marid.config import Config
from marid.lifecycle import Claim, LostLease
from marid.listen import UNAVAILABLE
from marid.runner.backend import (
    POLL,
    Assignment,
    Backend,
    DbBackend,
    Presence,
    RunnerRevoked,
    object_fetcher,
)
from marid.runner.caches import CacheSpec
from marid.runner.drivers.base import Driver, Limits, SshKey
from marid.runner.drivers.os import OsDriver, os_place
from marid.runner.execute import (
    BuildSpec,
    Execution,
    InfrastructureError,
    JobSpec,
    ObjectSpec,
    StageSpec,
    describe,
)
from marid.runner.reporter import Lease, Reporting

log = logging.getLogger(__name__)
PLACE_TIMEOUT = 10.0  # seconds the engine has at start to say its ID (`_places`)
RETRY_FIRST, RETRY_MAX = 0.5, 30.0  # seconds: the loop's backoff while it fails, doubled


class Worker:
    """A runner over the database (`pool` and `blobs`: an in-process runner) or over another
    Backend (runner/remote.py: a runner on another machine)."""

    def __init__(
        self,
        config: Config,
        pool: asyncpg.Pool | None = None,
        blobs: BlobStore | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.config = config
        if backend is None:
            # (Without a pool and a store it can only say what it offers: `drivers`.)
            instance = runners.instance_of(config.database.dsn)
            backend = DbBackend(config, cast(asyncpg.Pool, pool), cast(BlobStore, blobs), instance)
        self.backend = backend
        self.name = config.runner.name or f"{socket.gethostname()}-{os.getpid()}"
        self.ssh_key = self._ssh_key()  # None: this runner cannot run `ssh` builds
        # The driver types this server accepts that this runner can execute: it claims no
        # other build.
        runnable = ["docker", "os"]
        if self.ssh_key is not None:
            runnable.append("ssh")
        if self._can_boot():
            runnable.append("qemu")
        self.drivers = [d for d in config.drivers if d in runnable]
        self.running: dict[int, Execution] = {}
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.docker: Any = None  # docker.DockerClient, made on first use
        # Where the workspaces this runner keeps are, and which others' it reaches (docs/api.md
        # §27): `os:<host>`, `qemu:<host>:<work dir>`, and `docker:<engine id>` once the engine
        # has answered (`_places`).
        self.places: dict[str, str] = {"os": os_place()} if "os" in self.drivers else {}
        if "qemu" in self.drivers:
            from marid.runner.drivers import qemu

            self.places["qemu"] = qemu.qemu_place(config.qemu_driver)

    @property
    def instance(self) -> str:
        """This installation's label on the containers its runners make (a runner on another
        machine learns it when it registers)."""
        return self.backend.instance

    def _ssh_key(self) -> Any:
        """The private key of config ssh_driver, when `ssh` is enabled and the driver set up
        (key and known_hosts readable); else None, logged once."""
        from marid.runner.drivers import ssh

        if "ssh" not in self.config.drivers:
            return None
        settings = self.config.ssh_driver
        if settings.key is None or settings.known_hosts is None:
            log.warning("runner: drivers lists ssh but ssh_driver is not set; not running ssh")
            return None
        try:
            key = ssh.load_key(settings.key)
            ssh.check_known_hosts(settings.known_hosts)
        except ValueError as exc:
            log.error("runner: ssh_driver: %s; not running ssh builds", exc)
            return None
        return key

    def _can_boot(self) -> bool:
        """Whether `qemu` is enabled and this host has the programs it needs (logged if not)."""
        from marid.runner.drivers import qemu

        if "qemu" not in self.config.drivers:
            return False
        missing = qemu.missing_programs(self.config.qemu_driver)
        if missing:
            log.warning(
                "runner: drivers lists qemu but %s not installed; not running qemu builds",
                " and ".join(missing) + (" is" if len(missing) == 1 else " are"),
            )
        return not missing

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and execute builds until `stop` is set, then wait for running builds."""
        await self._places()
        presence = Presence(
            self.name,
            self.drivers,
            self.config.runner.parallelism,
            runners.interval_for(self.config.runner.lease),
            self.config.builds.max_running_per_user,
            lambda: list(self.places.values()),
            list(self.config.runner.labels),
        )
        drivers, parallelism = ",".join(self.drivers), self.config.runner.parallelism
        log.info("runner %s: drivers %s, parallelism %d", self.name, drivers, parallelism)
        try:
            async with self.backend.beside(presence, stop, self.wake.set, self._kill):
                try:
                    await self._loop(stop, presence)
                finally:
                    if self.tasks:
                        await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            if self.docker is not None:
                self.docker.close()

    async def _places(self) -> None:
        """Learn the docker engine's ID, the place of the volumes it keeps: an engine that
        does not answer now leaves this runner unable to keep or resume docker workspaces
        until it restarts (logged), not unable to run builds."""
        if "docker" not in self.drivers:
            return
        from marid.runner.drivers import docker

        try:
            async with asyncio.timeout(PLACE_TIMEOUT):
                client = await asyncio.to_thread(docker.docker_client, self.config.docker.host)
                info = await asyncio.to_thread(client.info)
            if self.docker is None:
                self.docker = client
            else:  # one was given meanwhile (tests): it is the one used
                await asyncio.to_thread(client.close)
            self.places["docker"] = f"docker:{info['ID']}"
        except Exception as exc:
            log.warning(
                "runner %s: the docker engine did not say its ID (%s): docker workspaces are"
                " not kept for resuming until the runner restarts",
                self.name,
                _reason(exc),
            )

    async def _loop(self, stop: asyncio.Event, presence: Presence) -> None:
        """Claim while there is capacity, then sleep until woken, a retry is due or POLL
        passes; a failing round (database, server, engine or blob store away) is retried with
        capped backoff, logged once."""
        failures = 0
        while not stop.is_set():
            self.wake.clear()  # a NOTIFY from now on makes another round
            try:
                await self.backend.tend()
                await self._fill(presence)
                full = len(self.tasks) >= self.config.runner.parallelism
                wait = POLL if full else await self.backend.idle(presence)
            except RunnerRevoked:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "runner %s: %s; retrying with backoff (up to %gs)",
                        self.name,
                        _reason(exc),
                        RETRY_MAX,
                    )
                wait = min(RETRY_MAX, RETRY_FIRST * 2 ** min(failures - 1, 16))
            else:
                if failures:
                    log.info("runner %s: working again after %d failed rounds", self.name, failures)
                failures = 0
            if wait <= 0 or stop.is_set():
                continue
            waiters = [asyncio.ensure_future(e.wait()) for e in (self.wake, stop)]
            await asyncio.wait(waiters, timeout=wait, return_when="FIRST_COMPLETED")
            for waiter in waiters:
                waiter.cancel()

    def _kill(self, build_id: int) -> None:
        execution = self.running.get(build_id)
        if execution is not None:
            execution.kill.set()

    async def _fill(self, presence: Presence) -> None:
        """Claim builds while there is capacity."""
        while len(self.tasks) < self.config.runner.parallelism:
            assignment = await self.backend.claim(presence)
            if assignment is None:
                return
            task = asyncio.create_task(self._execute(assignment))
            self.tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.wake.set()  # capacity freed: look at the queue again

    async def _execute(self, assignment: Assignment) -> None:
        """Run one attempt to its end: the build finished, or the attempt handed back for a
        retry (or failed for good) when anything outside the user's commands went wrong."""
        claim = assignment.claim
        log.info("build %d: attempt %d started", claim.build_id, claim.attempt)
        lease = Lease(self.config.runner.lease)  # claimed just now
        reporter: Reporting | None = None
        try:
            try:
                plan = await assignment.plan()
                reporter = assignment.reporter(lease, plan)
                spec, driver = await self._load(plan, assignment)
            except LostLease:
                raise
            except Exception as exc:
                raise InfrastructureError(f"preparing the build: {describe(exc)}") from exc
            if claim.attempt > 1:
                await driver.clear_previous()  # a dead runner's containers may still run
            execution = Execution(spec, driver, reporter)
            self.running[claim.build_id] = execution
            heartbeat = asyncio.create_task(self._heartbeat(assignment, lease, execution))
            try:
                status = await execution.run()
            finally:  # a renewal after the build ended or was handed back would find it gone
                heartbeat.cancel()
            kept = None
            if execution.kept is not None:  # spec.keep_workspace: this runner has its place
                kept = lifecycle.KeptWorkspace(
                    claim.build_id,
                    claim.attempt,
                    plan.driver,
                    self.places[plan.driver],
                    execution.kept,
                )
            await reporter.build_finished(status, kept, plan.settings.keep_workspace)
            log.info("build %d: %s", claim.build_id, status)
        except LostLease:
            if lease.lapsed:  # stopped by this runner: say why, unless recovered meanwhile
                await self._attempt_failed(assignment, lease, lease.reason, 0.0)
            else:
                log.warning("build %d: attempt %d abandoned", claim.build_id, claim.attempt)
        except Exception as exc:
            if lease.lapsed:
                await self._attempt_failed(assignment, lease, lease.reason, 0.0)
                return
            infrastructure = isinstance(exc, InfrastructureError | OSError)
            reason = describe(exc) if infrastructure else _reason(exc)
            log.warning(
                "build %d: attempt %d failed: %s",
                claim.build_id,
                claim.attempt,
                reason,
                exc_info=not infrastructure,  # anything else may be a bug: its traceback
            )
            if reporter is not None:
                with contextlib.suppress(Exception):  # the output so far, then the reason
                    await reporter.flush()
            delay = self.config.runner.retry_delay * 2 ** min(claim.attempt - 1, 16)
            await self._attempt_failed(assignment, lease, reason, delay)
        finally:
            self.running.pop(claim.build_id, None)

    async def _attempt_failed(
        self, assignment: Assignment, lease: Lease, reason: str, delay: float
    ) -> None:
        """Hand the build back for a new attempt after `delay` seconds, or end it `failed` on
        its last (lifecycle.attempt_failed). Tried while the server is away, for as long
        again as a lease; after that, or when the build moved on, the lease's expiry does it."""
        claim = assignment.claim
        give_up = time.monotonic() + lease.seconds + max(lease.left(), 0)
        pause = RETRY_FIRST
        while True:
            try:
                await assignment.attempt_failed(reason, delay)
                return
            except LostLease:
                log.info("build %d: attempt %d was recovered meanwhile", *claim_ids(claim))
                return
            except UNAVAILABLE as exc:
                if time.monotonic() >= give_up:
                    log.warning(
                        "build %d: attempt %d not handed back (%s); its lease's expiry will",
                        *claim_ids(claim),
                        _reason(exc),
                    )
                    return
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)

    async def _heartbeat(self, assignment: Assignment, lease: Lease, execution: Execution) -> None:
        """Renew the lease; notice kill requests; stop the job when the lease is gone.

        The first renewal comes at once (over the database): a kill NOTIFY that arrived before
        the execution was in `self.running` (while the build was loaded) found nothing to
        kill, and the request must not wait a renewal period to be seen
        (docs/architecture.md). Over HTTP kills come with renewals only: one period first.

        A renewal that fails because the database is away is tried again; when the lease
        would run out before the next renewal, the runner stops the job itself, before any
        other runner may recover the build, so that no job runs twice (docs/manifest.md
        §6.13).
        """
        period = min(1.0, lease.seconds / 3)
        claim = assignment.claim
        failing = False
        if not self.backend.renew_at_once:
            await asyncio.sleep(period)
        while True:
            sent = time.monotonic()
            try:
                async with asyncio.timeout(max(lease.left() - period, period)):
                    killed = await assignment.renew(lease.seconds)
            except LostLease:
                log.warning("build %d: lease lost", claim.build_id)
                self._stop(execution, lease, lifecycle.LEASE_LOST)
                return
            except UNAVAILABLE as exc:
                if not failing:
                    log.warning(
                        "build %d: lease renewal failed (%s); retrying for %.0fs",
                        claim.build_id,
                        _reason(exc),
                        max(lease.left() - period, 0),
                    )
                failing = True
                if lease.left() <= period:  # the next renewal would come too late
                    away = time.monotonic() - lease.renewed
                    reason = (
                        f"{lifecycle.LEASE_LOST} ({self.backend.server} unreachable for"
                        f" {away:.0f}s);"
                        " this attempt was stopped so that no job runs twice"
                    )
                    log.warning("build %d: %s", claim.build_id, reason)
                    self._stop(execution, lease, reason)
                    return
                await asyncio.sleep(min(period, max(lease.left() - period, 0)))
                continue
            lease.renewed = sent
            if failing:
                log.info("build %d: lease renewed again", claim.build_id)
            failing = False
            if killed:
                execution.kill.set()
            await asyncio.sleep(period)

    @staticmethod
    def _stop(execution: Execution, lease: Lease, reason: str) -> None:
        """Stop the job for `reason`, which becomes its last line and the retry's reason."""
        lease.lapse(reason)
        execution.kill_reason = reason
        execution.kill.set()

    async def _load(self, plan: plans.Plan, assignment: Assignment) -> tuple[BuildSpec, Driver]:
        """The claimed build as the engine runs it, and its driver."""
        notices = []
        if plan.previous and plan.attempt > 1:
            notices.append(lifecycle.attempt_notice(plan.attempt, plan.previous))
        objects = plan.objects
        if plan.resume is not None:
            notices.append(_resume_notice(plan.resume))
            # The kept workspace has them, as the original's jobs left them.
            objects = []
        cache = None
        if plan.cache is not None:
            found = plan.cache
            store = assignment.cache_store()
            cache = CacheSpec(found.key, found.paths, found.max_size, found.limit_setting, store)
        spec = BuildSpec(
            stages=[
                StageSpec(s.name, s.allow_failures, [_job_spec(job) for job in s.jobs])
                for s in plan.stages
            ],
            env=dict(plan.env),
            secrets=plan.secrets,
            objects=[
                ObjectSpec(o.source, o.destination, object_fetcher(assignment, o), o.id)
                for o in objects
            ],
            keys=[SshKey(k.name, k.private_key, k.config) for k in plan.keys],
            timeout=plan.timeout,
            artifact_max_size=plan.settings.artifact_max_size,
            notice="\n".join(notices),
            keep_workspace=plan.settings.keep_workspace > 0 and plan.driver in self.places,
            cache=cache,
            # A resumed build's copied workspace holds what its cache paths held then.
            restore_cache=plan.resume is None,
        )
        driver = await self._driver(plan, assignment)
        if plan.resume is not None:
            driver.start_from, missing = self._kept_location(plan)
            spec = dataclasses.replace(spec, setup_error=missing)
        return spec, driver

    def _kept_location(self, plan: plans.Plan) -> tuple[str | None, str]:
        """Where the workspace a resumed build starts from is, or why it cannot start: it is
        no longer kept, or not where this runner reaches (claimed before the check, by a
        runner whose places changed)."""
        assert plan.resume is not None
        kept, original = plan.resume.workspace, plan.resume.original
        if kept is None:
            return None, f"the workspace of build #{original} is no longer kept"
        if kept.driver != plan.driver or self.places.get(kept.driver) != kept.place:
            return None, f"the workspace of build #{original} is not on this runner"
        return kept.location, ""

    async def _driver(self, plan: plans.Plan, assignment: Assignment) -> Driver:
        """The driver of the settings stored at submission (docs/manifest.md §9)."""
        limits = Limits(plan.memory, plan.cpus, plan.pids)
        if plan.driver == "os":
            return OsDriver(limits)
        if plan.driver == "ssh":
            return self._ssh_driver(plan)
        if plan.driver == "qemu":
            return self._qemu_driver(plan, limits, assignment)
        from marid.runner.drivers import docker

        if self.docker is None:  # one client per runner: connecting costs a round trip
            # ... off the event loop: an engine that hangs must not stop the lease renewals.
            self.docker = await asyncio.to_thread(docker.docker_client, self.config.docker.host)
        return docker.DockerDriver(
            client=self.docker,
            build_id=plan.build_id,
            attempt=plan.attempt,
            image=plan.driver_config["image"],
            workspace=plan.driver_config["workspace"],
            limits=limits,
            network=self.config.docker.network,
            pull=self.config.docker.pull,
            uploaded=assignment.docker_image,
            instance=self.instance,
            runtime=self.config.docker.runtime,
            cap_drop=self.config.docker.cap_drop,
            prepare_ahead=self.config.docker.prepare_ahead,
        )

    def _ssh_driver(self, plan: plans.Plan) -> Driver:
        from marid.runner.drivers import ssh

        settings = self.config.ssh_driver
        assert self.ssh_key is not None and settings.known_hosts is not None  # claimed: set up
        target = ssh.Target(
            plan.driver_config["address"],
            settings.user,
            self.ssh_key,
            settings.known_hosts,
            settings.connect_timeout,
        )
        return ssh.SshDriver(target, f"marid-{self.instance}-{plan.build_id}-{plan.attempt}")

    def _qemu_driver(self, plan: plans.Plan, limits: Limits, assignment: Assignment) -> Driver:
        from marid.runner.drivers import qemu

        return qemu.QemuDriver(
            self.config.qemu_driver,
            plan.driver_config["image"],
            limits,
            assignment.qemu_upload,
            f"marid-{self.instance}-{plan.build_id}-{plan.attempt}",
        )


def claim_ids(claim: Claim) -> tuple[int, int]:
    return claim.build_id, claim.attempt


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _job_spec(job: plans.Job) -> JobSpec:
    return JobSpec(job.name, job.commands, job.timeout, job.artifacts, job.id, job.reused)


def _resume_notice(resume: plans.Resume) -> str:
    """The create-driver job's first line in a resumed build."""
    return (
        f"Resuming build #{resume.original} from job {resume.job}: its workspace is copied,"
        " its earlier jobs are not run again"
    )


instance_of = runners.instance_of  # tests and tools import it from here
