"""Who uses the machine while a benchmark runs: CPU time per class of process from /proc,
and the Docker engine's container and volume events (bench/runner.py).

The machine is shared with other work, so every figure is reported beside how much of the
machine other processes took.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
from common import CLOCK_TICKS, MACHINE_CPUS, machine_time


@dataclass(frozen=True)
class ProcStat:
    comm: str
    ppid: int
    own: float  # utime + stime, seconds
    reaped: float  # cutime + cstime: exited children it waited for


def read_procs() -> dict[int, ProcStat]:
    """Every process's /proc/PID/stat, read once."""
    found: dict[int, ProcStat] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):  # processes come and go
            text = (entry / "stat").read_text()
            head, _, rest = text.rpartition(")")
            fields = rest.split()
            found[int(entry.name)] = ProcStat(
                head.partition("(")[2],
                int(fields[1]),
                (int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
                (int(fields[13]) + int(fields[14])) / CLOCK_TICKS,
            )
    return found


CLASSES = ("serve", "runner", "postgres", "bench", "engine", "others", "rest")


@dataclass
class Load:
    """Who used the machine's CPU over `seconds` of wall time (CPU seconds per class).

    serve, runner: `marid serve` and `marid runner`. postgres: the benchmark's cluster.
    bench: this script and its docker CLI runs. engine: dockerd, containerd and live
    container shims (shared with other sessions' containers). others: every other live
    process, i.e. other sessions' work and kernel threads. rest: the remainder, mostly
    short-lived processes that exited with no live parent to account them to: container
    shims and runc (ours and other sessions'), and other sessions' daemons that stopped.
    """

    seconds: float
    cpu: dict[str, float]

    def share(self, name: str) -> float:
        """The class's share of the whole machine (all CPUs) over the interval."""
        return self.cpu[name] / (self.seconds * MACHINE_CPUS) if self.seconds else 0.0


class LoadMeter:
    def __init__(self, postmaster: int, marid_pids: Callable[[], dict[str, int]]) -> None:
        self.postmaster = postmaster
        self.marid_pids = marid_pids  # {"serve": pid, "runner": pid}; the runner changes

    def snapshot(self) -> tuple[float, float, dict[int, ProcStat]]:
        return time.time(), machine_time(), read_procs()

    def since(self, start: tuple[float, float, dict[int, ProcStat]]) -> Load:
        wall0, machine0, procs0 = start
        wall1, machine1, procs1 = self.snapshot()
        cpu = dict.fromkeys(CLASSES, 0.0)
        marid_pids = {pid: name for name, pid in self.marid_pids().items()}
        engine = {pid for pid, p in procs1.items() if p.comm in ("dockerd", "containerd")}
        shims = {pid for pid, p in procs1.items() if p.comm.startswith("containerd-shim")}
        me = os.getpid()
        for pid, now in procs1.items():
            before = procs0.get(pid)
            own = now.own - (before.own if before else 0.0)
            reaped = now.reaped - (before.reaped if before else 0.0)
            if pid == 1:  # init: what it reaps is orphans, ours and others' alike
                cpu["others"] += own
                continue
            if pid in marid_pids:
                name = marid_pids[pid]
            elif pid == self.postmaster or now.ppid == self.postmaster:
                name = "postgres"
            elif pid == me or now.ppid == me:
                name = "bench"
            elif pid in engine or pid in shims or now.ppid in shims:
                name = "engine"
            else:
                name = "others"
            cpu[name] += own + reaped
        cpu["rest"] = max(0.0, (machine1 - machine0) - sum(cpu.values()))
        return Load(wall1 - wall0, cpu)


def load_text(load: Load, others_containers: int) -> str:
    return (
        f"others {load.share('others'):4.0%} (+{others_containers} containers)  "
        f"engine {load.share('engine'):4.0%}  "
        f"marid {load.share('serve') + load.share('runner'):4.0%}  "
        f"postgres {load.share('postgres'):4.0%}  rest {load.share('rest'):4.0%}"
    )


class EngineEvents:
    """The engine's container and volume events, collected by a thread while it runs."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.events: list[dict[str, Any]] = []
        self.stream = client.events(decode=True, filters={"type": ["container", "volume"]})
        self.thread = threading.Thread(target=self._read, name="engine-events", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):  # the stream raises when close() shuts it
            for event in self.stream:
                self.events.append(event)

    def close(self) -> None:
        self.stream.close()
        self.thread.join(5)

    def others_started(
        self, start: float, end: float, ours: Callable[[dict[str, Any]], bool]
    ) -> int:
        """Containers that other sessions started between `start` and `end`."""
        return sum(
            1
            for e in list(self.events)
            if e.get("Type") == "container"
            and e.get("Action") == "start"
            and start <= e["timeNano"] / 1e9 <= end
            and not ours(e)
        )
