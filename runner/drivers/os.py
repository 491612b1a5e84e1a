"""The `os` driver (docs/manifest.md §9.3): jobs as local processes in a temporary workspace.

No isolation: for development, tests, trusted runners and the offline runner. Objects and keys
are written inside the workspace; artifacts are read from absolute paths as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import resource
import shutil
import signal
import socket
import tarfile
import tempfile
from pathlib import Path

from marid.runner.drivers.base import (
    Capped,
    Driver,
    DriverError,
    Exit,
    Limits,
    OutputSink,
    SshKey,
    exited,
)

log = logging.getLogger(__name__)
GRACE = 10.0  # seconds between SIGTERM and SIGKILL
DRAIN = 1.0  # seconds a job's output may stay open after its shell exited
EXIT_POLL = 0.1  # seconds between looks at whether the shell exited
READ_SIZE = 65536
INHERITED = ("PATH", "LANG", "TZ")
WORKSPACE_PREFIX = "marid-workspace-"  # of the temporary directory of each build's workspace


def os_place() -> str:
    """Where this host's kept workspaces are, as runners announce it (docs/api.md §27)."""
    return f"os:{socket.gethostname()}"


def ssh_config(keys: list[SshKey], directory: str) -> str:
    """docs/manifest.md §6.5's config text, `/root/.ssh/` pointing at `directory` instead."""
    text = "\nStrictHostKeyChecking no\nUserKnownHostsFile /dev/null\n\n"
    text += "".join(key.config + "\n" for key in sorted(keys, key=lambda k: k.name))
    return text.replace("/root/.ssh/", directory.rstrip("/") + "/")


class OsDriver(Driver):
    def __init__(self, limits: Limits | None = None, inherit_env: bool = False) -> None:
        self.limits = limits
        self.inherit_env = inherit_env  # the offline runner passes the caller's environment
        self.workspace: Path | None = None
        self.scratch: Path | None = None
        self.extra_env: dict[str, str] = {}
        self.process: asyncio.subprocess.Process | None = None

    async def create(self, out: OutputSink) -> None:
        self.workspace = Path(tempfile.mkdtemp(prefix=WORKSPACE_PREFIX))
        self.scratch = Path(tempfile.mkdtemp(prefix="marid-scripts-"))
        await out(f"Created workspace {self.workspace}\n".encode())
        if self.start_from is not None:
            await asyncio.to_thread(self._copy_kept, Path(self.start_from))
            await out(f"Copied the kept workspace {self.start_from} into it\n".encode())

    def _copy_kept(self, source: Path) -> None:
        """Fill the new workspace with a copy of `source`, a workspace `keep` left."""
        assert self.workspace is not None
        if not source.is_dir():
            raise DriverError(f"the kept workspace {source} is gone")
        try:
            shutil.copytree(source, self.workspace, symlinks=True, dirs_exist_ok=True)
        except (OSError, shutil.Error) as exc:
            raise DriverError(f"copying the kept workspace {source}: {exc}") from None

    def inside(self, path: str) -> Path:
        """`path` resolved in the workspace: absolute paths are re-rooted under it and a path
        that leaves it through `..` is refused."""
        assert self.workspace is not None
        target = (self.workspace / path.lstrip("/")).resolve()
        if target != self.workspace and self.workspace not in target.parents:
            raise DriverError(f"{path}: outside the workspace")
        return target

    async def place_object(self, content: Path, destination: str) -> str:
        target = self.inside(destination)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(content, target)
            target.chmod(0o644)
        except OSError as exc:
            raise DriverError(f"{destination}: {exc.strerror}") from None
        return str(target)

    async def write_keys(self, keys: list[SshKey]) -> dict[str, str]:
        directory = self.inside(".ssh")
        directory.mkdir(mode=0o700, exist_ok=True)
        locations = {}
        for key in keys:
            path = directory / key.name
            path.touch(mode=0o600)
            path.write_text(key.private_key)
            locations[key.name] = str(path)
        config = directory / "config"
        config.touch(mode=0o600)
        config.write_text(ssh_config(keys, str(directory)))
        self.extra_env["GIT_SSH_COMMAND"] = f"ssh -F {config}"
        return locations

    def _environment(self, env: dict[str, str]) -> dict[str, str]:
        assert self.workspace is not None
        base = dict(os.environ) if self.inherit_env else {
            name: os.environ[name] for name in INHERITED if name in os.environ
        }  # fmt: skip
        return {**base, "HOME": str(self.workspace), **env, **self.extra_env}

    def _apply_limits(self) -> None:
        """Runs in the child before exec: memory and process limits (best effort)."""
        if self.limits is not None:
            resource.setrlimit(resource.RLIMIT_AS, (self.limits.memory, self.limits.memory))
            resource.setrlimit(resource.RLIMIT_NPROC, (self.limits.pids, self.limits.pids))

    async def run(self, job: str, script: str, env: dict[str, str], out: OutputSink) -> Exit:
        assert self.workspace is not None and self.scratch is not None
        path = self.scratch / "job.sh"
        path.write_text(script)
        try:
            self.process = await asyncio.create_subprocess_exec(
                "/bin/sh",
                str(path),
                cwd=self.workspace,
                env=self._environment(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group, so stop() reaches children
                preexec_fn=self._apply_limits,
            )
        except OSError as exc:
            raise DriverError(f"cannot start /bin/sh: {exc.strerror}") from None
        process = self.process
        reader = asyncio.create_task(self._pump(process, out))
        try:
            # Output until it ends or the shell exits. asyncio's wait() returns only once the
            # output is closed too (Python 3.11), so the shell's exit is watched by polling.
            while not await _finished(reader, EXIT_POLL) and process.returncode is None:
                pass
            if reader.done():
                reader.result()  # the sink failed (e.g. a lost lease): raise it now
            elif not await _finished(reader, DRAIN):
                # The shell is gone and a background process (`server &`) still holds the
                # output open: end the job's process group, as the end of a job's container
                # would, rather than wait for the job's time limit.
                log.info("job %s: killing what it left running in the background", job)
                self._signal(process, signal.SIGKILL)
                if not await _finished(reader, DRAIN):  # one that left the group keeps it open
                    raise DriverError("a background process of the job keeps its output open")
                reader.result()
            return exited(await process.wait())
        except asyncio.CancelledError:
            # stop() ended the job: what it wrote last is still passed on, for up to DRAIN
            # seconds, and nothing after run() ends (docs/manifest.md §6.8: the line saying why
            # the job ended comes last).
            await _finished(reader, DRAIN)
            raise
        finally:
            reader.cancel()
            await asyncio.wait((reader,))
            if not reader.cancelled():
                reader.exception()  # raised above already, or a sink failing while draining

    @staticmethod
    async def _pump(process: asyncio.subprocess.Process, out: OutputSink) -> None:
        assert process.stdout is not None
        while chunk := await process.stdout.read(READ_SIZE):
            await out(chunk)

    async def collect(self, source: str, destination: Path, max_size: int) -> None:
        # An absolute source is read where it is, as Djinn's os driver does (its
        # Test_WorkerCollectArtifacts collects /etc/hosts): a job here can read anything the
        # runner can anyway, so confining artifacts would protect nothing (issue 12).
        path = Path(source) if source.startswith("/") else self.inside(source)
        if not path.exists():
            raise DriverError(f"{source}: no such file")
        if path.is_dir():
            raise DriverError(f"{source}: is a directory")
        if not path.is_file():  # a device or FIFO (/dev/zero) would never end
            raise DriverError(f"{source}: not a regular file")
        size = path.stat().st_size
        if max_size and size > max_size:
            raise DriverError(f"{source} exceeds the maximum artifact size of {max_size} bytes")
        try:
            shutil.copyfile(path, destination)
        except OSError as exc:
            raise DriverError(f"{source}: {exc.strerror}") from None

    async def archive(self, paths: list[str], destination: Path, max_size: int) -> list[str]:
        for path in paths:  # a path reached through a link out of the workspace is refused
            self.inside(posixpath.dirname(path) or ".")
        try:
            return await asyncio.to_thread(self._archive, paths, destination, max_size)
        except (tarfile.TarError, OSError) as exc:
            raise DriverError(f"cannot archive the cache: {exc}") from None

    def _archive(self, paths: list[str], destination: Path, max_size: int) -> list[str]:
        assert self.workspace is not None
        missing = []
        with (
            destination.open("wb") as file,
            tarfile.open(
                fileobj=Capped(file, max_size), mode="w|", format=tarfile.PAX_FORMAT
            ) as tar,
        ):
            for path in paths:
                full = self.workspace / path
                if full.exists() or full.is_symlink():
                    tar.add(full, arcname=path)  # recursive; links are not followed
                else:
                    missing.append(path)
        return missing

    async def extract(self, archive: Path) -> None:
        assert self.workspace is not None
        try:
            await asyncio.to_thread(_extract, archive, self.workspace)
        except (tarfile.TarError, OSError) as exc:
            raise DriverError(f"cannot unpack the cache: {exc}") from None

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        self._signal(process, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), GRACE)
        except TimeoutError:
            self._signal(process, signal.SIGKILL)

    @staticmethod
    def _signal(process: asyncio.subprocess.Process, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)

    async def keep(self) -> str | None:
        """End what still runs and remove the scripts; the workspace stays (docs/api.md §27)."""
        workspace, self.workspace = self.workspace, None
        await self.destroy()
        return str(workspace) if workspace is not None else None

    async def destroy(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self._signal(self.process, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await self.process.wait()
        for directory in (self.workspace, self.scratch):
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)


def _extract(archive: Path, workspace: Path) -> None:
    # The `data` filter refuses absolute names, `..`, links leading out and device files: a
    # cache is written by earlier builds' commands, so it is untrusted input.
    with tarfile.open(archive, mode="r:") as tar:
        tar.extractall(workspace, filter="data")


async def _finished(task: asyncio.Task[None], seconds: float) -> bool:
    """Whether `task` ends within `seconds` (it is not cancelled when it does not)."""
    done, _ = await asyncio.wait((task,), timeout=seconds)
    return bool(done)
