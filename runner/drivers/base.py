"""The Driver protocol: what the execution engine (runner/execute.py) needs from a driver.

One driver instance serves one build. The engine calls, in order: `create()` once, then
`place_object()` / `write_keys()` during the setup job, then `run()` once per job (one job
at a time) followed by `collect()` for each of that job's artifacts, and finally
`destroy()` whatever happened. `stop()` may be called at any time from another task (kill,
timeout) and must make a running `run()` return promptly. Before all that, `expect()` tells
the driver which jobs `run()` will be asked for, so that it may prepare one while another runs.
"""

from __future__ import annotations

import signal
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

# Receives raw output bytes of a job as they are produced (stdout and stderr merged).
OutputSink = Callable[[bytes], Awaitable[None]]


class DriverError(Exception):
    """A failure the engine reports in the job output (`str(exc)` is the reason)."""


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

    async def clear_previous(self) -> None:  # noqa: B027 - optional, most drivers have nothing
        """Before a recovered attempt: remove what earlier attempts of this build left running
        (their runner died). Never raises."""

    @abstractmethod
    async def destroy(self) -> None:
        """Remove everything the driver made (containers, volume, workspace). Idempotent and
        never raises: failures are logged."""
