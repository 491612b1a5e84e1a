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

from marid.manifest import script
from marid.output import Masker
from marid.runner.drivers.base import Driver, DriverError, SshKey

log = logging.getLogger(__name__)

CREATE_DRIVER_LIMIT = 5 * 60.0  # docs/manifest.md §6.11
SEVERITY = ("passed", "passed_with_failures", "failed", "killed", "timed_out")


@dataclass(frozen=True)
class JobSpec:
    name: str
    commands: str  # one command per line; "" runs nothing
    timeout: float | None = None
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (source, name)
    id: int | None = None  # the database row, when there is one


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
        ArtifactError when it cannot be kept."""


class ArtifactError(Exception):
    """A collected artifact the reporter could not keep; reported as an artifact error."""


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
        self.masker = Masker(spec.secrets)
        self.deadline = 0.0
        self.statuses: list[str] = []

    async def run(self) -> str:
        """Run every stage in order and return the build's final status."""
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.spec.timeout
        finished: set[str] = set()
        try:
            for position, stage in enumerate(self.spec.stages):
                for index, job in enumerate(stage.jobs):
                    is_setup_job = position == 0 and index == 0
                    status = await (self._create(job) if is_setup_job else self._job(job, stage))
                    self.statuses.append(status)
                    finished.add(job.name)
                    if status not in ("passed", "passed_with_failures"):
                        raise _Stop()
        except _Stop:
            pass
        finally:
            await self.driver.destroy()
        final = worst(self.statuses)
        for stage in self.spec.stages:
            for job in stage.jobs:
                if job.name not in finished:
                    await self.reporter.job_finished(job, final, ran=False)
        return final

    async def _emit(self, job: JobSpec, data: bytes) -> None:
        text = self.masker.feed(data)
        if text:
            await self.reporter.job_output(job, text)

    async def _flush(self, job: JobSpec) -> None:
        text = self.masker.finish()
        if text:
            await self.reporter.job_output(job, text)

    async def _create(self, job: JobSpec) -> str:
        """The create-driver job: environment, objects and keys (docs/manifest.md §6.1, step 2)."""
        await self.reporter.job_started(job)

        async def out(data: bytes) -> None:
            await self._emit(job, data)

        async def setup() -> None:
            await self.driver.create(out)
            await self._place_objects(job)
            if self.spec.keys:
                for name, location in (await self.driver.write_keys(self.spec.keys)).items():
                    await self.reporter.key_placed(name, location)

        limit = min(CREATE_DRIVER_LIMIT, self._remaining())
        status = await self._guard(job, setup(), limit)
        await self._flush(job)
        await self.reporter.job_finished(job, status, ran=True)
        return status

    async def _place_objects(self, job: JobSpec) -> None:
        with tempfile.TemporaryDirectory(prefix="marid-object-") as scratch:
            for obj in self.spec.objects:
                line = f"Placing object {obj.source} => {obj.destination}\n"
                await self._emit(job, line.encode())
                try:
                    if obj.fetch is None:
                        raise DriverError(f"{obj.source}: no such object")
                    local = Path(scratch) / "content"
                    await obj.fetch(local)
                    await self.driver.place_object(local, obj.destination)
                except (DriverError, OSError) as exc:
                    await self._emit(job, f"object error: {exc}\n".encode())
                    continue  # placement failures never fail the build (§6.4)
                await self.reporter.object_placed(obj)

    async def _job(self, job: JobSpec, stage: StageSpec) -> str:
        await self.reporter.job_started(job)
        if not job.commands:
            await self.reporter.job_finished(job, "passed", ran=True)
            return "passed"

        async def out(data: bytes) -> None:
            await self._emit(job, data)

        exit_codes: list[int] = []

        async def run() -> None:
            text = script([job.commands])
            exit_codes.append(await self.driver.run(job.name, text, self.spec.env, out))

        limit = self._remaining() if job.timeout is None else min(job.timeout, self._remaining())
        status = await self._guard(job, run(), limit)
        if status == "passed" and exit_codes[0] != 0:
            status = "passed_with_failures" if stage.allow_failures else "failed"
        elif status == "failed" and stage.allow_failures:
            status = "passed_with_failures"  # the job could not start, in an allowed stage
        if status in ("passed", "passed_with_failures", "failed"):
            collected = await self._collect(job)
            if not collected and status == "passed" and self.spec.artifacts_required:
                status = "passed_with_failures" if stage.allow_failures else "failed"
        await self._flush(job)
        await self.reporter.job_finished(job, status, ran=True)
        return status

    async def _guard(self, job: JobSpec, work: Awaitable[None], limit: float) -> str:
        """Run `work` until it ends, the kill event fires, or `limit` seconds pass.

        Returns `passed` when it ended (the caller checks its result), `failed` when it raised
        DriverError (reported as `error: <reason>`), else `killed` or `timed_out`.
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
                await self._emit(job, f"error: {exc}\n".encode())
                return "failed"
            return "passed"
        status = "killed" if self.kill.is_set() else "timed_out"
        await self.driver.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, DriverError):
            await task
        return status

    async def _collect(self, job: JobSpec) -> bool:
        """Collect the job's artifacts, whatever its exit status (docs/manifest.md §6.7); returns
        whether every one was."""
        collected = True
        for source, name in job.artifacts:
            await self._emit(job, f"Collecting artifact {source} => {name}\n".encode())
            with tempfile.TemporaryDirectory(prefix="marid-artifact-") as scratch:
                local = Path(scratch) / "content"
                try:
                    await self.driver.collect(source, local, self.spec.artifact_max_size)
                    await self.reporter.artifact_collected(job, source, name, local)
                except (DriverError, ArtifactError) as exc:
                    await self._emit(job, f"artifact error: {exc}\n".encode())
                    collected = False
        return collected

    def _remaining(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()


class _Stop(Exception):
    """Execution ends early: a job failed outside an allowed stage, was killed or timed out."""
