"""The execution engine: runs a build's stages and jobs with a driver (docs/manifest.md §6).

It knows nothing of the database: what happens is told to a Reporter (the queue worker's
writes to PostgreSQL, or the offline runner's stdout), so `marid runner` and `marid run`
share this code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from marid.manifest import format_duration, script
from marid.output import Masker
from marid.runner import caches
from marid.runner.drivers.base import Driver, DriverError, Exit, SshKey, Upcoming

log = logging.getLogger(__name__)

CREATE_DRIVER_LIMIT = 5 * 60.0  # docs/manifest.md §6.11
SEVERITY = ("passed", "passed_with_failures", "failed", "killed", "timed_out")
KILLED_ON_REQUEST = "killed on request"  # docs/manifest.md §6.8
KEPT_AFTER = ("failed", "killed", "timed_out")  # a build ending so keeps its workspace (§27)


@dataclass(frozen=True)
class JobSpec:
    name: str
    commands: str  # one command per line; "" runs nothing
    timeout: float | None = None
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (source, name)
    id: int | None = None  # the database row, when there is one
    # A resumed build's job before the one it resumes from (docs/api.md §27): never run, its
    # status the original's.
    reused: str | None = None


@dataclass(frozen=True)
class StageSpec:
    name: str
    allow_failures: bool
    jobs: list[JobSpec]


@dataclass(frozen=True)
class ObjectSpec:
    source: str
    destination: str
    # Writes the object's content to a local file; None when the object does not exist.
    fetch: Callable[[Path], Awaitable[None]] | None
    id: int | None = None


@dataclass(frozen=True)
class BuildSpec:
    """Everything needed to run a build. The first stage is the setup stage, whose first job
    is `create-driver`."""

    stages: list[StageSpec]
    env: dict[str, str]
    secrets: list[str]  # plaintexts of masked variables, scrubbed from all output
    objects: list[ObjectSpec]
    keys: list[SshKey]
    timeout: float
    artifact_max_size: int  # bytes; 0: no limit
    # An artifact that cannot be collected fails its job, as a non-zero exit would (the offline
    # runner: the files are what its caller ran it for). The server's runners leave the job's
    # status alone and only say so in its output (docs/manifest.md, artifacts).
    artifacts_required: bool = False
    # A line of marid's that opens the create-driver output, e.g. why the previous attempt
    # ended (docs/manifest.md §6.13); "" for none.
    notice: str = ""
    # Keep the workspace of a build that ends `failed`, `killed` or `timed_out` (Driver.keep),
    # for resuming it (docs/api.md §27).
    keep_workspace: bool = False
    # Why the create-driver job fails before it creates anything (a resumed build whose kept
    # workspace is gone); "" for none.
    setup_error: str = ""
    cache: caches.CacheSpec | None = None  # the manifest's `cache:` (docs/manifest.md §10)
    restore_cache: bool = True  # False: `cache` is saved, never restored (a resumed build)


class Reporter(Protocol):
    async def job_started(self, job: JobSpec) -> None: ...

    async def job_output(self, job: JobSpec, text: str) -> None:
        """Masked output text, in order, as it is produced."""

    async def job_finished(self, job: JobSpec, status: str, ran: bool) -> None:
        """Final status; `ran` is False for jobs that never started (docs/manifest.md §6.1,
        step 6)."""

    async def object_placed(self, obj: ObjectSpec) -> None: ...

    async def key_placed(self, name: str, location: str) -> None: ...

    async def artifact_collected(self, job: JobSpec, source: str, name: str, path: Path) -> None:
        """The artifact's content is in the local file `path` (removed afterwards). Raises
        ArtifactError when it cannot be kept for a reason of the user's, InfrastructureError
        when storage failed."""


class ArtifactError(Exception):
    """A collected artifact the reporter could not keep; reported as an artifact error."""


class InfrastructureError(Exception):
    """A failure outside the user's commands (blob store, engine, database, decryption): it is
    not reported as the job's; it ends the run (Execution.run raises it) and the server's
    runner retries the build as a new attempt (docs/manifest.md §6.13). `str(exc)` is the
    reason shown to the user, so it names the step, never a secret."""


def describe(exc: BaseException) -> str:
    """A reason for the user: an OSError as `[Errno 28] No space left on device` (no path: it
    is the server's), anything else as its text, or its class name when it has none."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc) or type(exc).__name__


def worst(statuses: list[str]) -> str:
    """The most severe status (docs/manifest.md §6.9); `passed` for none."""
    return max(statuses, key=SEVERITY.index, default="passed")


class Execution:
    """One run of one build. `kill` may be set from outside at any time."""

    def __init__(self, spec: BuildSpec, driver: Driver, reporter: Reporter) -> None:
        self.spec = spec
        self.driver = driver
        self.reporter = reporter
        self.kill = asyncio.Event()
        # The last line of the job a kill stops (docs/manifest.md §6.8): a runner stopping a
        # job for a reason of its own sets it before setting `kill`.
        self.kill_reason = KILLED_ON_REQUEST
        self.masker = Masker(spec.secrets)
        self.deadline = 0.0
        self.statuses: list[str] = []
        self.line_start = True  # the job's output so far ends with a line break (or is empty)
        self.kept: str | None = None  # where the workspace was kept (Driver.keep), if it was

    async def run(self) -> str:
        """Run every stage in order and return the build's final status. Anything but a
        DriverError or ArtifactError (the user's) raises through, InfrastructureError above all,
        after the environment is removed."""
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.spec.timeout
        self.driver.expect(self._upcoming())
        finished: set[str] = set()
        ended = False  # the jobs ran to the build's end: not a failure outside them
        try:
            for position, stage in enumerate(self.spec.stages):
                for index, job in enumerate(stage.jobs):
                    is_setup_job = position == 0 and index == 0
                    if job.reused is not None:
                        status = job.reused
                    elif is_setup_job:
                        status = await self._create(job)
                    else:
                        status = await self._job(job, stage)
                    self.statuses.append(status)
                    finished.add(job.name)
                    if status not in ("passed", "passed_with_failures"):
                        raise _Stop()
            ended = True
        except _Stop:
            ended = True
        finally:
            created = bool(self.statuses) and self.statuses[0] == "passed"
            failed = worst(self.statuses) in KEPT_AFTER
            if ended and created and self.spec.keep_workspace and failed:
                self.kept = await self.driver.keep()
            else:
                await self.driver.destroy()
        final = worst(self.statuses)
        for stage in self.spec.stages:
            for job in stage.jobs:
                if job.name not in finished:
                    await self.reporter.job_finished(job, final, ran=False)
        return final

    def _upcoming(self) -> list[Upcoming]:
        """The jobs `_job` will hand the driver, in order, if none stops the build: the setup
        job, jobs without commands and reused jobs run no script."""
        jobs = [job for stage in self.spec.stages for job in stage.jobs][1:]
        return [
            Upcoming(job.name, script([job.commands]), self.spec.env)
            for job in jobs
            if job.commands and job.reused is None  # a resumed build's reused jobs never run
        ]

    async def _emit(self, job: JobSpec, data: bytes) -> None:
        if data:
            self.line_start = data.endswith(b"\n")
        text = self.masker.feed(data)
        if text:
            await self.reporter.job_output(job, text)

    async def _say(self, job: JobSpec, line: str) -> None:
        """Write one of marid's own lines to the job's output, on a line of its own."""
        await self._emit(job, ("" if self.line_start else "\n").encode() + f"{line}\n".encode())

    async def _flush(self, job: JobSpec) -> None:
        text = self.masker.finish()
        if text:
            await self.reporter.job_output(job, text)

    async def _create(self, job: JobSpec) -> str:
        """The create-driver job: environment, objects and keys (docs/manifest.md §6.1, step 2)."""
        await self.reporter.job_started(job)
        self.line_start = True
        if self.spec.notice:
            await self._say(job, self.spec.notice)

        async def out(data: bytes) -> None:
            await self._emit(job, data)

        async def setup() -> None:
            if self.spec.setup_error:
                raise DriverError(self.spec.setup_error)
            await self.driver.create(out)
            if self.spec.cache is not None and self.spec.restore_cache:
                # First: this build's objects win over stale copies.
                await caches.restore(self.spec.cache, self.driver, lambda t: self._say(job, t))
            await self._place_objects(job)
            if self.spec.keys:
                for name, location in (await self.driver.write_keys(self.spec.keys)).items():
                    await self.reporter.key_placed(name, location)

        status, reason = await self._guard(setup(), *self._limit(CREATE_DRIVER_LIMIT))
        if reason:
            await self._say(job, reason)
        await self._flush(job)
        await self.reporter.job_finished(job, status, ran=True)
        return status

    async def _place_objects(self, job: JobSpec) -> None:
        with tempfile.TemporaryDirectory(prefix="marid-object-") as scratch:
            for obj in self.spec.objects:
                await self._say(job, f"Placing object {obj.source} => {obj.destination}")
                try:
                    if obj.fetch is None:
                        raise DriverError(f"{obj.source}: no such object")
                    local = Path(scratch) / "content"
                    await obj.fetch(local)
                    await self.driver.place_object(local, obj.destination)
                except (DriverError, OSError) as exc:
                    await self._say(job, f"object error: {exc}")
                    continue  # placement failures never fail the build (§6.4)
                await self.reporter.object_placed(obj)

    async def _job(self, job: JobSpec, stage: StageSpec) -> str:
        await self.reporter.job_started(job)
        self.line_start = True
        if not job.commands:
            await self._save_cache(job, "passed")
            await self.reporter.job_finished(job, "passed", ran=True)
            return "passed"

        async def out(data: bytes) -> None:
            await self._emit(job, data)

        exits: list[Exit] = []

        async def run() -> None:
            text = script([job.commands])
            exits.append(await self.driver.run(job.name, text, self.spec.env, out))

        status, reason = await self._guard(run(), *self._limit(job.timeout))
        if status == "passed" and exits[0].reason:
            status = "passed_with_failures" if stage.allow_failures else "failed"
            reason = exits[0].reason
        elif status == "failed" and stage.allow_failures:
            status = "passed_with_failures"  # the job could not start, in an allowed stage
        if status in ("passed", "passed_with_failures", "failed"):
            collected = await self._collect(job)
            if not collected and status == "passed" and self.spec.artifacts_required:
                status = "passed_with_failures" if stage.allow_failures else "failed"
        await self._save_cache(job, status)
        if reason:  # the last line says why the job ended, when not with exit status 0
            await self._say(job, reason)
        await self._flush(job)
        await self.reporter.job_finished(job, status, ran=True)
        return status

    async def _save_cache(self, job: JobSpec, status: str) -> None:
        """At the end of the build's last job, unless it failed: save the cache (§10)."""
        last = [j for stage in self.spec.stages for j in stage.jobs][-1]
        final = worst([*self.statuses, status])
        if self.spec.cache is not None and job is last and final in SEVERITY[:2]:
            await caches.save(self.spec.cache, self.driver, lambda t: self._say(job, t), final)

    async def _guard(
        self, work: Awaitable[None], limit: float, limit_reason: str
    ) -> tuple[str, str]:
        """Run `work` until it ends, the kill event fires, or `limit` seconds pass.

        Returns (status, the line saying why): (`passed`, "") when it ended (the caller checks
        its result), (`failed`, `error: <reason>`) when it raised DriverError, else (`killed`,
        the kill's reason) or (`timed_out`, `limit_reason`).
        """
        task = asyncio.ensure_future(work)
        killed = asyncio.ensure_future(self.kill.wait())
        try:
            await asyncio.wait({task, killed}, timeout=max(limit, 0), return_when="FIRST_COMPLETED")
        finally:
            killed.cancel()
        if task.done():
            try:
                task.result()
            except DriverError as exc:
                return "failed", f"error: {exc}"
            return "passed", ""
        ending = ("killed", self.kill_reason) if self.kill.is_set() else ("timed_out", limit_reason)
        await self.driver.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, DriverError):
            await task
        return ending

    async def _collect(self, job: JobSpec) -> bool:
        """Collect the job's artifacts, whatever its exit status (docs/manifest.md §6.7); returns
        whether every one was."""
        collected = True
        for source, name in job.artifacts:
            await self._say(job, f"Collecting artifact {source} => {name}")
            with tempfile.TemporaryDirectory(prefix="marid-artifact-") as scratch:
                local = Path(scratch) / "content"
                try:
                    await self.driver.collect(source, local, self.spec.artifact_max_size)
                    await self.reporter.artifact_collected(job, source, name, local)
                except (DriverError, ArtifactError) as exc:
                    await self._say(job, f"artifact error: {exc}")
                    collected = False
        return collected

    def _limit(self, own: float | None) -> tuple[float, str]:
        """The seconds a job may take, its own limit or what is left of the build's, and the
        line saying which was reached (docs/manifest.md §6.11)."""
        remaining = self._remaining()
        if own is not None and own <= remaining:
            return own, f"time limit {format_duration(own)} reached"
        return remaining, f"build time limit {format_duration(self.spec.timeout)} reached"

    def _remaining(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()


class _Stop(Exception):
    """Execution ends early: a job failed outside an allowed stage, was killed or timed out."""
