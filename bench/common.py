"""What the benchmarks share: a throwaway PostgreSQL cluster, server processes, the marid
configuration they run with, CPU accounting from /proc, and a clean exit on Ctrl-C.

Used by bench/user.py (issue 2) and bench/runner.py (issue 4); each script's directory is
first on sys.path, so they `import common`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aiohttp
import asyncpg
import yaml

from marid.pgcluster import Cluster, ClusterError, free_port, new_password

STOP_TIMEOUT = 10.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MACHINE_CPUS = os.cpu_count() or 1
T = TypeVar("T")


class BenchError(Exception):
    """The benchmark cannot go on; str() says why."""


@dataclass
class Process:
    """One long-running process (a server, a runner), its output in `log`."""

    name: str
    argv: list[str]
    log: Path
    cpus: set[int] | None = None
    env: dict[str, str] | None = None  # added to this process's environment
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log.open("ab") as out:
            # Its own session: Ctrl-C reaches only the benchmark, which stops the process itself.
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )
        if self.cpus:
            os.sched_setaffinity(self.proc.pid, self.cpus)  # what `taskset -p` does

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def wait_for_line(self, text: str, timeout: float) -> None:
        """Wait until the log holds a line containing `text` (a process says it is ready)."""
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            self.check_alive("at start-up")
            if time.monotonic() > deadline:
                raise self.failure(f"did not log {text!r} within {timeout:.0f}s")
            time.sleep(0.05)

    def check_alive(self, when: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise self.failure(f"exited with status {self.proc.returncode} {when}")

    def failure(self, message: str) -> BenchError:
        """An error carrying the tail of the process's log."""
        tail = self.log.read_text(errors="replace").strip().splitlines()[-20:]
        return BenchError("\n    ".join([f"{self.name}: {message}; its log ends:", *tail]))


def throwaway_cluster(stack: contextlib.ExitStack, prefix: str) -> tuple[Path, Cluster]:
    """A temporary directory and a started PostgreSQL cluster in it (durable settings: fsync
    and synchronous commit on), both removed when `stack` closes."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    stack.callback(shutil.rmtree, directory, ignore_errors=True)
    directory.chmod(0o755)  # PostgreSQL may run as another user (see marid/pgcluster.py)
    cluster = Cluster(directory / "pg", free_port(), new_password())
    cluster.init()
    stack.callback(cluster.stop)
    cluster.start(fast=False)
    return directory, cluster


async def create_database(cluster: Cluster, name: str) -> None:
    admin = await asyncpg.connect(cluster.dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


def postmaster_pid(cluster: Cluster) -> int:
    return int((cluster.data / "postmaster.pid").read_text().split()[0])


def write_marid_config(path: Path, dsn: str, port: int, **sections: Any) -> Path:
    """A marid configuration file for one process on 127.0.0.1:`port`; `sections` are merged
    over the server, database and crypto sections every process needs."""
    config: dict[str, Any] = {
        "server": {"url": f"http://127.0.0.1:{port}", "listen": f"127.0.0.1:{port}"},
        "database": {"dsn": dsn},
        "crypto": {"key": os.urandom(32).hex()},
        # The benchmarks load one token far past any sane client's rate.
        "rate_limit": {"enabled": False},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)  # it holds the database password and the crypto key
    return path


def marid_argv(command: str, config: Path) -> list[str]:
    """`marid COMMAND --config FILE` with the console script of this script's venv."""
    return [str(Path(sys.executable).parent / "marid"), command, "--config", str(config)]


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name: state is [0], ppid [1], utime,
    stime, cutime, cstime [11:15]."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def cpu_time(pid: int) -> float:
    """User plus system CPU seconds of process `pid` so far (0 once it is gone)."""
    try:
        fields = _stat(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children_time() -> float:
    """CPU seconds of this process's finished children (wrk, docker CLI runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_time() -> float:
    """CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_time() -> float:
    """CPU seconds so far of all processes on the machine plus those the hypervisor stole.

    Interrupt time is left out: it is mostly the loopback traffic of the benchmark itself.
    """
    line = Path("/proc/stat").read_text().split("\n", 1)[0]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = map(int, line.split()[1:9])
    return (user + nice + system + steal) / CLOCK_TICKS


def family_time(parent: int, exited_children: bool = True) -> float:
    """CPU seconds so far of `parent` and its live children, plus (by default) those of its
    exited children that it reaped: for PostgreSQL, the postmaster and its backends (asyncpg
    replaces a pool connection after 50,000 queries: its backend exits mid-run)."""
    fields = _stat(parent)
    columns = slice(11, 15) if exited_children else slice(11, 13)
    total = sum(int(v) for v in fields[columns])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):  # processes come and go
            fields = _stat(entry.name)
            if int(fields[1]) == parent:
                total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _interrupted(signum: int, frame: object) -> NoReturn:
    # A second Ctrl-C must not cut the clean-up short (each of its steps has a time limit).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def guarded(work: Callable[[contextlib.ExitStack], T], *errors: type[Exception]) -> T:
    """Run `work(stack)` and close the stack (stopping and removing everything registered on
    it) on return, error, Ctrl-C or SIGTERM. Exits 130 when interrupted, 1 on a BenchError,
    a cluster, subprocess, OS or database error, or one of `errors`."""
    # Clean up on kill as on Ctrl-C, also when started with SIGINT ignored (`... &` in a script).
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    try:
        with contextlib.ExitStack() as stack:
            return work(stack)
    except KeyboardInterrupt:
        print("bench: interrupted; processes, cluster and files removed", file=sys.stderr)
        sys.exit(130)
    except (
        BenchError,
        ClusterError,
        subprocess.SubprocessError,
        OSError,
        asyncpg.PostgresError,
        *errors,
    ) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        sys.exit(1)


async def wait_serving(
    session: aiohttp.ClientSession,
    serve: Process,
    api: str,
    headers: dict[str, str],
    bound: float,
    *others: Process,
) -> None:
    """Return once `serve` answers GET /api/user with 200 (a token's user); fail when it, or
    one of `others`, exits meanwhile, or after `bound` seconds of refused connections."""
    deadline = time.monotonic() + bound
    while True:
        for process in (serve, *others):
            process.check_alive("at start-up")
        try:
            async with session.get(api + "/user", headers=headers) as resp:
                if resp.status == 200:
                    return
                raise serve.failure(f"GET /api/user answered {resp.status}")
        except aiohttp.ClientConnectionError:
            if time.monotonic() > deadline:
                raise serve.failure(f"not answering after {bound:.0f}s") from None
            await asyncio.sleep(0.1)


# -- Figures (bench/pickup.py, bench/remote.py)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def spread(values: list[float]) -> str:
    """p50/p90/p99/max of milliseconds."""
    if not values:
        return "(none)"
    figures = [statistics.median(values), quantile(values, 0.9), quantile(values, 0.99)]
    return "  ".join(
        f"{name} {value:7.2f}"
        for name, value in zip(("p50", "p90", "p99", "max"), [*figures, max(values)], strict=True)
    )
