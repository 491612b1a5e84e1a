"""The Driver protocol: what the execution engine (runner/execute.py) needs from a driver.

One driver instance serves one build. The engine calls, in order: `create()` once, then
`place_object()` / `write_keys()` during the setup job, then `run()` once per job (one job
at a time) followed by `collect()` for each of that job's artifacts, and finally
`destroy()` whatever happened. `stop()` may be called at any time from another task (kill,
timeout) and must make a running `run()` return promptly. A build with a `cache:` (docs/manifest.md
§10) also calls `extract()` during the setup job and `archive()` after its last job. Before all
that, `expect()` tells the driver which jobs `run()` will be asked for, so that it may prepare
one while another runs.
"""

from __future__ import annotations

import io
import signal
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

# Receives raw output bytes of a job as they are produced (stdout and stderr merged).
OutputSink = Callable[[bytes], Awaitable[None]]


class DriverError(Exception):
    """A failure the engine reports in the job output (`str(exc)` is the reason)."""


class TooLarge(DriverError):
    """An archive() that grew past its `max_size`."""


class Capped(io.RawIOBase):
    """A writable file that passes writes on to `file` and raises TooLarge once more than
    `max_size` bytes (0: no limit) were written."""

    def __init__(self, file: BinaryIO, max_size: int) -> None:
        self.file = file
        self.max_size = max_size
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.written += len(data)
        if self.max_size and self.written > self.max_size:
            raise TooLarge(f"larger than {self.max_size} bytes")
        return self.file.write(data)


@dataclass(frozen=True)
class Exit:
    """How a job's script ended: its exit status, and the line saying why when it was not a
    plain exit 0 (docs/manifest.md §6.8)."""

    status: int | None  # None: the driver could not learn it (the container vanished)
    reason: str = ""  # "" for exit status 0, and only then


def exited(status: int) -> Exit:
    """The Exit of a shell that returned `status`. A signal N comes as -N (Python's
    returncode) or as 128 + N, as the shell's `$?` and docker's init report it."""
    number = -status if status < 0 else status - 128 if 128 < status < 128 + signal.NSIG else 0
    if number:
        return Exit(status, signalled(number))
    return Exit(status, f"exit status {status}" if status else "")


def signalled(number: int) -> str:
    """`killed by signal 9 (SIGKILL)`, `terminated by signal 15 (SIGTERM)`."""
    try:
        name = f" ({signal.Signals(number).name})"
    except ValueError:  # a real-time signal has no name of its own
        name = ""
    verb = "killed" if number == signal.SIGKILL else "terminated"
    return f"{verb} by signal {number}{name}"


@dataclass(frozen=True)
class Limits:
    memory: int  # bytes
    cpus: float
    pids: int


@dataclass(frozen=True)
class SshKey:
    name: str
    private_key: str
    config: str


@dataclass(frozen=True)
class Upcoming:
    """A job `run()` will be asked for, with the arguments it will be given."""

    job: str
    script: str
    env: dict[str, str]


class Driver(ABC):
    # A resumed build's driver (docs/api.md §27): where the workspace it starts from is, as
    # `keep` returned it for the original. Set before `create`, which then fills the new
    # workspace with a copy of it; only drivers that `keep` workspaces are given one.
    start_from: str | None = None

    def expect(self, jobs: list[Upcoming]) -> None:  # noqa: B027 - optional, a hint only
        """The jobs `run()` will be called for, in this order, if the build goes that far (it
        stops at a failed job, a kill or a time limit). A driver may prepare a job's
        environment while earlier ones run (docker: docs/manifest.md §9.2), but nothing of a
        job may run before `run()` is called for it; a call that differs from the list must
        still work, as if nothing had been said."""

    @abstractmethod
    async def create(self, out: OutputSink) -> None:
        """Create the environment (docker: resolve/load the image, make the workspace volume;
        os: make the temporary workspace). Messages for the create-driver job go to `out`.
        Raises DriverError when the environment cannot be created."""

    @abstractmethod
    async def place_object(self, content: Path, destination: str) -> str:
        """Copy the file `content` to `destination` (relative to the workspace, or absolute;
        mode 0644, parents created). Returns the path it was placed at. Raises DriverError."""

    @abstractmethod
    async def write_keys(self, keys: list[SshKey]) -> dict[str, str]:
        """Write each key (mode 0600) and an SSH config (docs/manifest.md §6.5; os driver:
        docs/manifest.md §9.3). Returns {key name: location}. Raises DriverError."""

    @abstractmethod
    async def run(self, job: str, script: str, env: dict[str, str], out: OutputSink) -> Exit:
        """Run the job script with /bin/sh in the workspace with `env`, streaming output to
        `out`; returns how it ended. Raises DriverError if the job cannot be started. When it
        returns or is cancelled, all the output it passes on has reached `out`."""

    @abstractmethod
    async def collect(self, source: str, destination: Path, max_size: int) -> None:
        """Copy artifact `source` (relative to the workspace, or absolute) from the last job's
        environment to the local file `destination`. Raises DriverError with the reason when it
        is missing, unreadable, a directory, or larger than `max_size` bytes (0: no limit)."""

    @abstractmethod
    async def stop(self) -> None:
        """Terminate the running job, if any (SIGTERM, SIGKILL after 10 s). Idempotent."""

    async def archive(self, paths: list[str], destination: Path, max_size: int) -> list[str]:
        """Write a tar of the workspace `paths` (relative, normalised, docs/manifest.md §10) to
        the local file `destination`, members named by their path in the workspace, symbolic
        links kept as links. Returns the paths that do not exist. Raises TooLarge past
        `max_size` bytes (0: no limit), DriverError when it cannot be made."""
        raise DriverError(f"caches are not supported by the {self.kind} driver")

    async def extract(self, archive: Path) -> None:
        """Unpack the tar `archive` (as archive() writes them) into the workspace; nothing it
        holds may land outside. Raises DriverError."""
        raise DriverError(f"caches are not supported by the {self.kind} driver")

    @property
    def kind(self) -> str:
        """The driver type's name, for messages."""
        return type(self).__name__.removesuffix("Driver").lower()

    async def clear_previous(self) -> None:  # noqa: B027 - optional, most drivers have nothing
        """Before a recovered attempt: remove what earlier attempts of this build left running
        (their runner died). Never raises."""

    async def keep(self) -> str | None:
        """Instead of `destroy`, when the build ended failed, killed or timed_out: remove everything
        but the workspace, and return where it is (a docker volume's name, a directory), for a
        resumed build's `start_from`. None: this driver keeps no workspace, and everything is
        removed. Never raises."""
        await self.destroy()
        return None

    @abstractmethod
    async def destroy(self) -> None:
        """Remove everything the driver made (containers, volume, workspace). Idempotent and
        never raises: failures are logged."""
