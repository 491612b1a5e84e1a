"""`marid run`: execute a manifest locally, without server or database (docs/manifest.md §9.4)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from marid import manifest
from marid.manifest import DEFAULT_LIMITS, Manifest
from marid.runner.drivers.base import Driver, Limits
from marid.runner.drivers.os import OsDriver
from marid.runner.execute import (
    ArtifactError,
    BuildSpec,
    Execution,
    JobSpec,
    ObjectSpec,
    StageSpec,
)
from marid.validation import ValidationError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_MANIFESTS = (".marid.yml", ".djinn.yml")


class Failure(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ConsoleReporter:
    """Job output to stdout as it comes (unmasked: offline runs have no stored secrets);
    one status line per job on stderr."""

    def __init__(self, artifacts: Path) -> None:
        self.artifacts = artifacts

    async def job_started(self, job: JobSpec) -> None:
        print(f"==> {job.name}", file=sys.stderr, flush=True)

    async def job_output(self, job: JobSpec, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    async def job_finished(self, job: JobSpec, status: str, ran: bool) -> None:
        print(f"<== {job.name}: {status}" + ("" if ran else " (not run)"), file=sys.stderr)

    async def object_placed(self, obj: ObjectSpec) -> None:
        pass

    async def key_placed(self, name: str, location: str) -> None:
        pass

    async def artifact_collected(self, job: JobSpec, source: str, name: str, path: Path) -> None:
        target = (self.artifacts / name).resolve()
        if self.artifacts.resolve() not in target.parents:
            raise ArtifactError(f"{name}: outside {self.artifacts}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        except OSError as exc:
            raise ArtifactError(f"{name}: cannot write {target}: {exc.strerror}") from None


def load(path: Path | None) -> Manifest:
    """The manifest at `path` (default .marid.yml, else .djinn.yml), validated."""
    if path is None:
        path = next((Path(p) for p in DEFAULT_MANIFESTS if Path(p).exists()), None)
        if path is None:
            raise Failure(EXIT_USAGE, "no manifest: give --manifest or create .marid.yml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Failure(EXIT_USAGE, f"cannot read {path}: {exc}") from None
    try:
        parsed = manifest.parse(text, DEFAULT_LIMITS)
    except ValidationError as exc:
        own = [
            f"{field}: {m}"
            for field, found in exc.errors.items()
            if field != "manifest"
            for m in found
        ]
        raise Failure(EXIT_USAGE, "\n".join(exc.errors.get("manifest", []) + own)) from None
    if parsed.driver.type not in ("docker", "os"):
        raise Failure(EXIT_USAGE, f"driver {parsed.driver.type} cannot run offline (docker, os)")
    return parsed


def build_spec(parsed: Manifest, stage: str | None, objects: Path) -> BuildSpec:
    plan = manifest.plan(parsed, 1)
    stages = [
        StageSpec(s.name, s.allow_failures, [
            JobSpec(j.name, j.commands, j.timeout, list(j.artifacts)) for j in s.jobs
        ])
        for position, s in enumerate(plan.stages)
        if position == 0 or stage is None or s.name == stage
    ]  # fmt: skip
    if stage is not None and len(stages) == 1:
        raise Failure(EXIT_USAGE, f"no stage named {stage!r} in the manifest")
    return BuildSpec(
        stages=stages,
        env=dict(parsed.env),
        secrets=[],
        objects=[ObjectSpec(src, dest, _reader(objects / src)) for src, dest in parsed.objects],
        keys=[],
        timeout=parsed.timeout,
        artifact_max_size=0,  # no limit: they go to the caller's own disk
        artifacts_required=True,
    )


def _reader(path: Path) -> Callable[[Path], Awaitable[None]] | None:
    if not path.is_file():
        return None

    async def fetch(target: Path) -> None:
        shutil.copyfile(path, target)

    return fetch


def driver_for(parsed: Manifest, pull: str = "if-not-present") -> Driver:
    r = parsed.resources
    limits = Limits(r.memory, r.cpus, r.pids)
    if parsed.driver.type == "os":
        return OsDriver(limits, inherit_env=True)
    from docker.errors import DockerException

    from marid.runner.drivers import docker

    async def nothing_uploaded(_name: str) -> None:
        return None

    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.docker_client(host)
    except DockerException as exc:
        raise Failure(EXIT_FAILED, f"no Docker engine at {host}: {exc}") from None
    return docker.DockerDriver(
        client=client,
        build_id=0,
        attempt=uuid.uuid4().int % 10**9,
        image=parsed.driver.config["image"],
        workspace=parsed.driver.config["workspace"],
        limits=limits,
        network=None,
        pull=pull,  # --pull, as docker.pull on a server (docs/configuration.md §2.9)
        uploaded=nothing_uploaded,
        pull_setting="--pull",
    )


async def execute(args: argparse.Namespace) -> int:
    parsed = load(args.manifest)
    spec = build_spec(parsed, args.stage, args.objects)
    execution = Execution(spec, driver_for(parsed, args.pull), ConsoleReporter(args.artifacts))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, execution.kill.set)  # Ctrl-C kills the build cleanly
    status = await execution.run()
    print(f"build {status}", file=sys.stderr)
    return EXIT_OK if status in ("passed", "passed_with_failures") else EXIT_FAILED


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(execute(args))
    except Failure as exc:
        print(f"marid run: {exc}", file=sys.stderr)
        return exc.status
