"""Where a build's (or a bare `docker run`'s) time goes: steps between moments taken from
the client, the database and the Docker engine's events, and calls traced in the runner
(bench/traced_runner.py). Used by bench/runner.py.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable
from typing import Any

BARE_LABEL = "marid.bench"  # on the bare runs' containers: their runs are told apart by it


def engine_times(events: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """First time (seconds) of each action, keyed by bare-run label or `build:<id>`; a build's
    volume actions are `volume-create` and `volume-destroy`."""
    times: dict[str, dict[str, float]] = {}
    volume = re.compile(r"marid-(\d+)-\d+")
    for event in events:
        attributes = event.get("Actor", {}).get("Attributes", {})
        action, at = event.get("Action", ""), event["timeNano"] / 1e9
        key = None
        if event.get("Type") == "container":
            if BARE_LABEL in attributes:
                key = attributes[BARE_LABEL]
            elif "marid.build" in attributes and not attributes.get("name", "").endswith("-files"):
                key = f"build:{attributes['marid.build']}"
        elif event.get("Type") == "volume" and action in ("create", "destroy"):
            match = volume.fullmatch(event.get("Actor", {}).get("ID", ""))
            if match:
                key, action = f"build:{match.group(1)}", f"volume-{action}"
        if key is not None:
            times.setdefault(key, {}).setdefault(action, at)
    return times


BUILD_STEPS = [
    ("POST /builds until the build row's transaction starts", "sent", "created"),
    ("queued until claimed (commit, NOTIFY, runner wakes, claims)", "created", "claimed"),
    ("claimed until create-driver starts (load build, docker client)", "claimed", "cd_started"),
    ("create-driver: image lookup, volume create", "cd_started", "volume-create"),
    ("create-driver: output flush, job UPDATE", "volume-create", "cd_finished"),
    ("until job s.1 starts", "cd_finished", "job_started"),
    ("s.1: container create", "job_started", "create"),
    ("s.1: put_archive (the job script)", "create", "extract-to-dir"),
    ("s.1: attach", "extract-to-dir", "attach"),
    ("s.1: start (runc)", "attach", "start"),
    ("s.1: `true` runs until the engine sees it exit", "start", "die"),
    ("s.1: wait, close stream, output flush, job UPDATE", "die", "job_finished"),
    ("destroy: list and remove the container", "job_finished", "destroy"),
    ("destroy: list and remove the volume", "destroy", "volume-destroy"),
    ("build UPDATE (finished_at)", "volume-destroy", "finished"),
    ("`passed` visible through GET (commit, poll)", "finished", "visible"),
]
CLIENT_STEPS = [
    ("job s.1 finished until the stream's first event (output)", "job_finished", "first_event"),
    ("the stream's first event until GET shows `passed`", "first_event", "visible"),
]
SSE_STEPS = [("job s.1 finished until its SSE `status` event", "job_finished", "job_done")]
BARE_STEPS = [
    ("CLI starts until the container is created", "spawned", "create"),
    ("attach", "create", "attach"),
    ("start (runc)", "attach", "start"),
    ("`true` runs until the engine sees it exit", "start", "die"),
    ("remove (--rm, by the engine)", "die", "destroy"),
    ("CLI sees the removal and exits", "destroy", "exited"),
]


def build_points(client: dict[str, float], row: Any, engine: dict[str, float]) -> dict[str, float]:
    """One build's moments, in seconds: the client's (`sent`, `visible`, ...), the database's
    (`claimed`, `job_started`, ...) and the engine's (`create`, `volume-destroy`, ...)."""
    points = {**client, **engine}
    for key, column in [
        ("created", "created_at"),
        ("claimed", "started_at"),
        ("finished", "finished_at"),
        ("cd_started", "cd_started"),
        ("cd_finished", "cd_finished"),
        ("job_started", "job_started"),
        ("job_finished", "job_finished"),
    ]:
        points[key] = row[column].timestamp()
    return points


def steps_table(
    title: str, steps: list[tuple[str, str, str]], points: list[dict[str, float]]
) -> None:
    print(f"\n{title} ({len(points)} runs; ms)")
    print(f"  {'step':64}{'median':>8}{'mean':>8}{'p90':>8}")
    total_mean = 0.0
    for label, start, end in steps:
        values = [(p[end] - p[start]) * 1000 for p in points if start in p and end in p]
        if not values:
            print(f"  {label:64}{'-':>8}")
            continue
        total_mean += statistics.fmean(values)
        print(
            f"  {label:64}{statistics.median(values):8.1f}"
            f"{statistics.fmean(values):8.1f}{p90(values):8.1f}"
        )
    first, last = steps[0][1], steps[-1][2]
    totals = [(p[last] - p[first]) * 1000 for p in points if first in p and last in p]
    if totals:
        print(
            f"  {'total':64}{statistics.median(totals):8.1f}{statistics.fmean(totals):8.1f}"
            f"{p90(totals):8.1f}   (means of the steps add up to {total_mean:.1f})"
        )


def call_name(kind: str, what: str) -> str:
    """A traced call named without its container, volume or image."""
    if kind == "sql":
        return "SQL " + what
    what = re.sub(r" /(containers|volumes)/(?!create$|json$|prune$)[^/]+", r" /\1/{id}", what)
    return re.sub(r" /images/.+/json$", " /images/{name}/json", what)


def trace_table(
    title: str, trace: list[tuple[str, str, float, float]], points: list[dict[str, float]]
) -> None:
    """Per build (from its claim to its finished_at): each kind of call's count and wall time,
    medians over the builds, in the order they first happen; then the time in no call."""
    per_build: list[dict[str, tuple[int, float, float]]] = []
    outside: list[float] = []
    gaps: dict[str, list[float]] = {}
    calls = sorted(trace, key=lambda call: call[2])
    for p in points:
        start, end = p["claimed"] - 0.002, p["finished"] + 0.002
        mine = [c for c in calls if start <= c[2] <= end]
        found: dict[str, tuple[int, float, float]] = {}
        for kind, what, t0, t1 in mine:
            count, total, first = found.get(call_name(kind, what), (0, 0.0, t0 - start))
            found[call_name(kind, what)] = (count + 1, total + (t1 - t0) * 1000, first)
        per_build.append(found)
        covered, reach, before = 0.0, start, "the claim"
        for kind, what, t0, t1 in mine:  # the union of the call intervals
            if t0 > reach:
                label = f"after {before}, before {call_name(kind, what)}"
                gaps.setdefault(label, []).append((t0 - reach) * 1000)
            t0, t1 = max(t0, reach), min(t1, end)
            if t1 > t0:
                covered += t1 - t0
                reach, before = t1, call_name(kind, what)
        outside.append((end - start - covered) * 1000)
    names = {name for found in per_build for name in found}
    order = sorted(names, key=lambda n: statistics.median(f[n][2] for f in per_build if n in f))
    print(f"\n{title} ({len(points)} builds; ms, medians over the builds)")
    print(f"  {'call':86}{'count':>6}{'wall':>8}")
    for name in order:
        counts = [f.get(name, (0, 0.0, 0.0))[0] for f in per_build]
        walls = [f.get(name, (0, 0.0, 0.0))[1] for f in per_build]
        print(f"  {name[:86]:86}{statistics.median(counts):6.0f}{statistics.median(walls):8.1f}")
    print(
        f"  {'in no traced call (Python on the event loop, thread hand-offs, waiting)':86}"
        f"{'':6}{statistics.median(outside):8.1f}"
    )
    print("  the largest gaps between calls (sum over the builds / builds, ms):")
    largest = sorted(gaps.items(), key=lambda item: -sum(item[1]))[:8]
    for label, values in largest:
        print(f"    {sum(values) / len(points):6.1f}  {label[:100]}")


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]
