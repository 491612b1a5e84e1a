"""Benchmark of a ten-job docker build (issue 14, item 5) against ten bare `docker run`s.

Target: a docker build of 10 jobs each running `true` goes from POST /builds to `passed` in at
most 0.6 times the time of 10 sequential `docker run --rm --network none IMAGE true`.

A throwaway PostgreSQL cluster (durable settings) holds one migrated database with one user
and a full-scope token. `marid serve` and `marid runner` run as separate processes on a
loopback free port, with `drivers: [docker]`, `docker.network: none` (--network build: marid's
default) and `runner.parallelism: 1`. Each round runs every variant of the runner's settings,
the runner restarted with the variant's configuration (and given one untimed build, which
also pays for the runner's start), and for each variant a pair in
alternating order (bare first, then build first in the next round): (a) ten sequential bare
runs, timed from the first spawn to the last exit; (b) one build of ten jobs, timed from
sending POST /builds until GET /b/<user>/<n> shows `passed` (polled every --poll-ms). The
variants measure each means on its own:

- `runc, none ahead`: docker.runtime runc, docker.prepare_ahead 0: each job's container is
  made when the job is due, under the engine's default runtime;
- `runc, 2 ahead`: the next two jobs' containers made and started while a job runs;
- `crun, none ahead`: the faster runtime alone;
- `crun, 2 ahead`: both (marid's defaults when the engine has crun);
- with --before TREE, `before` first: the runner of another tree (the code before this
  change), with its defaults.

With docker.network none every variant but `before` also makes its containers without an
engine network (docs/manifest.md §9.2); the engine-only part below measures what that saves.

A last part times the engine alone, with docker-py as marid calls it (create, attach, start,
wait, remove; no marid): one container under runc and crun, with the engine's `none` network
and with no engine network (what the driver does for docker.network none), so that the
network set-up's share is known too.

Prints every pair with the machine's load during it, then per variant the medians and the
ratio against the 0.6 target. Everything it started is stopped and removed on exit, Ctrl-C
included.

    .venv/bin/python bench/multijob.py [--rounds N] [--jobs J] [--network none|build]
                                       [--engine-rounds N] [--before TREE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from common import (
    BenchError,
    Process,
    cpu_model,
    guarded,
    marid_argv,
    postmaster_pid,
    throwaway_cluster,
    write_marid_config,
)
from docker.errors import DockerException
from docker.types import LogConfig
from machine import EngineEvents, Load, LoadMeter, load_text

from marid.pgcluster import Cluster, free_port
from runner import (
    BARE_LABEL,
    BUILD_TIMEOUT,
    DATABASE,
    ENGINE,
    IMAGE,
    READY_TIMEOUT,
    RUNNER_READY,
    BareRun,
    Marid,
    bare_run,
    check_engine,
    prepare,
    remove_leftovers,
    wait_ready,
)

TARGET = 0.6
SETTLE = 0.25  # seconds between two timed operations


@dataclass(frozen=True)
class Variant:
    name: str
    runtime: str | None
    prepare_ahead: int | None
    tree: str | None = None  # --before: the runner's code comes from this tree


VARIANTS = [
    Variant("runc, none ahead", "runc", 0),
    Variant("runc, 2 ahead", "runc", 2),
    Variant("crun, none ahead", "crun", 0),
    Variant("crun, 2 ahead", "crun", 2),
]


def manifest(jobs: int) -> str:
    lines = [f"driver: {{type: docker, image: {IMAGE}, workspace: /w}}", "stages: [s]", "jobs:"]
    lines += ['  - {stage: s, commands: ["true"]}'] * jobs
    return "\n".join(lines) + "\n"


@dataclass
class Pair:
    variant: Variant
    bare: float  # seconds for the sequential bare runs
    build: float  # seconds from POST /builds to `passed` seen
    build_id: int
    load: Load
    others_containers: int
    db: dict[str, float] = field(default_factory=dict)  # phases from the database

    @property
    def ratio(self) -> float:
        return self.build / self.bare


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every variant (1-50)")
    parser.add_argument("--jobs", type=int, default=10, help="jobs per build and bare runs (1-50)")
    parser.add_argument("--poll-ms", type=int, default=20, help="GET interval (1-200)")
    parser.add_argument(
        "--engine-rounds", type=int, default=12, help="containers per engine-only case (0-100)"
    )
    parser.add_argument(
        "--network",
        default="none",
        choices=("none", "build"),
        help="the runner's docker.network (default none, as the bare runs; build: marid's"
        " default, a bridge network of each build's own)",
    )
    parser.add_argument(
        "--before",
        metavar="TREE",
        help="also run the runner from TREE (e.g. `git archive main | tar -x -C TREE`), with"
        " its defaults and docker.network none: marid as it was",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="marid's logging.level (default: info, marid's own default)",
    )
    args = parser.parse_args()
    for name, low, high in [
        ("rounds", 1, 50),
        ("jobs", 1, 50),
        ("poll_ms", 1, 200),
        ("engine_rounds", 0, 100),
    ]:
        if not low <= getattr(args, name) <= high:
            parser.error(f"--{name.replace('_', '-')} must be between {low} and {high}")
    return args


class Bench:
    def __init__(
        self, args: argparse.Namespace, directory: Path, cluster: Cluster, client: Any
    ) -> None:
        self.args = args
        self.directory = directory
        self.cluster = cluster
        self.client = client
        self.session_label = secrets.token_hex(4)
        self.first_build_id = 10**9 + secrets.randbelow(10**12)
        self.counter = 0
        self.pairs: list[Pair] = []
        self.current: Variant | None = None
        self.marid: Marid | None = None
        self.meter: LoadMeter | None = None
        self.events: EngineEvents | None = None
        self.variants = list(VARIANTS)
        if args.before:
            self.variants.insert(0, Variant("before", None, None, args.before))

    def ours(self, event: dict[str, Any]) -> bool:
        attributes = event.get("Actor", {}).get("Attributes", {})
        if attributes.get(BARE_LABEL, "").startswith(self.session_label + "-"):
            return True
        with contextlib.suppress(ValueError):
            return self.build_ids(int(attributes.get("marid.build", "")))
        return False

    def build_ids(self, build_id: int) -> bool:
        return self.first_build_id <= build_id < self.first_build_id + 10**6

    def next_label(self) -> str:
        self.counter += 1
        return f"{self.session_label}-{self.counter}"

    def runner(self, variant: Variant) -> Process:
        assert self.marid is not None
        slug = variant.name.replace(", ", "-").replace(" ", "-")
        path = write_marid_config(
            self.directory / f"runner-{slug}.yml",
            self.marid.dsn,
            self.marid.port,
            drivers=["docker"],
            docker={
                "host": ENGINE,
                "network": self.args.network,
                **({} if variant.runtime is None else {"runtime": variant.runtime}),
                **(
                    {}
                    if variant.prepare_ahead is None
                    else {"prepare_ahead": variant.prepare_ahead}
                ),
            },
            runner={"name": "bench", "parallelism": 1},
            storage={"path": str(self.directory / "blobs")},
            logging={"level": self.args.log_level},
        )
        log = self.directory / f"{slug}.log"
        env = None if variant.tree is None else {"PYTHONPATH": variant.tree}
        return Process("marid runner", marid_argv("runner", path), log, env=env)

    async def use(self, session: aiohttp.ClientSession, variant: Variant) -> None:
        """Restart the runner with `variant`'s settings unless it runs with them, then run one
        untimed build: a runner's first build also pays for its start (imports, connections)."""
        assert self.marid is not None
        if self.current == variant:
            return
        self.marid.runner.stop()
        self.marid.runner = self.runner(variant)
        self.marid.runner.start()
        self.marid.runner.wait_for_line(RUNNER_READY, READY_TIMEOUT)
        self.current = variant
        await self.build(session)

    def start(self, stack: contextlib.ExitStack) -> None:
        token = asyncio.run(prepare(self.cluster, self.first_build_id))
        dsn, port = self.cluster.dsn(DATABASE), free_port()
        path = write_marid_config(
            self.directory / "serve.yml",
            dsn,
            port,
            drivers=["docker"],
            storage={"path": str(self.directory / "blobs")},
            logging={"level": self.args.log_level},
        )
        serve = Process("marid serve", marid_argv("serve", path), self.directory / "serve.log")
        self.marid = Marid(serve, serve, port, dsn, token, self.build_ids)
        stack.callback(lambda: self.marid and self.marid.serve.stop())
        stack.callback(lambda: self.marid and self.marid.runner.stop())  # the current one
        serve.start()
        self.marid.runner = self.runner(self.variants[0])
        self.marid.runner.start()
        self.marid.runner.wait_for_line(RUNNER_READY, READY_TIMEOUT)
        stack.callback(lambda: remove_leftovers(self.client, self.session_label, self.build_ids))
        self.events = EngineEvents(self.client)
        stack.callback(self.events.close)
        marid = self.marid
        self.meter = LoadMeter(
            postmaster_pid(self.cluster),
            lambda: {"serve": marid.serve.pid, "runner": marid.runner.pid},
        )

    async def bare(self) -> float:
        runs: list[BareRun] = []
        for _ in range(self.args.jobs):
            runs.append(await bare_run(self.next_label()))
        return runs[-1].exited - runs[0].spawned

    async def build(self, session: aiohttp.ClientSession) -> tuple[float, int]:
        assert self.marid is not None
        marid = self.marid
        sent = time.time()
        body = {"manifest": manifest(self.args.jobs)}
        async with session.post(marid.api + "/builds", json=body, headers=marid.headers) as resp:
            created = await resp.json(content_type=None)
            if resp.status != 201:
                raise marid.serve.failure(f"POST /builds answered {resp.status} {created}")
        deadline = time.monotonic() + BUILD_TIMEOUT
        while time.monotonic() < deadline:
            async with session.get(created["url"], headers=marid.headers) as resp:
                status = (await resp.json())["status"]
            if status == "passed":
                return time.time() - sent, created["id"]
            if status not in ("queued", "running"):
                raise marid.runner.failure(f"{created['url']} ended {status}")
            await asyncio.sleep(self.args.poll_ms / 1000)
        raise BenchError(f"{created['url']} not passed after {BUILD_TIMEOUT:.0f}s")

    async def pair(self, session: aiohttp.ClientSession, variant: Variant, number: int) -> Pair:
        assert self.meter is not None and self.events is not None
        start = self.meter.snapshot()
        results: dict[str, Any] = {}
        for kind in ("bare", "build") if number % 2 == 0 else ("build", "bare"):
            await asyncio.sleep(SETTLE)
            results[kind] = await (self.bare() if kind == "bare" else self.build(session))
        load = self.meter.since(start)
        others = self.events.others_started(start[0], start[0] + load.seconds, self.ours)
        seconds, build_id = results["build"]
        return Pair(variant, results["bare"], seconds, build_id, load, others)

    async def measure(self) -> None:
        assert self.marid is not None
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, self.marid)
            for variant in self.variants:  # warm-up: every runner once, the engine's caches
                await self.use(session, variant)
            await self.bare()
            for number in range(self.args.rounds):
                # Each round visits the variants in the other direction: drift hits all alike.
                order = self.variants if number % 2 == 0 else self.variants[::-1]
                for variant in order:
                    await self.use(session, variant)
                    pair = await self.pair(session, variant, number)
                    self.pairs.append(pair)
                    print(
                        f"round {number + 1:2}  {variant.name:17}  bare {pair.bare:5.2f} s  "
                        f"build {pair.build:5.2f} s  ratio {pair.ratio:4.2f}  "
                        f"{load_text(pair.load, pair.others_containers)}",
                        flush=True,
                    )
        await self.phases()

    async def phases(self) -> None:
        """Split each build with the database's timestamps: queued until claimed, the
        create-driver job, the jobs (first start to last end), and the rest."""
        conn = await asyncpg.connect(self.cluster.dsn(DATABASE))
        try:
            rows = await conn.fetch(
                """
                SELECT b.id, b.status, b.created_at, b.started_at, b.finished_at,
                       min(j.finished_at) FILTER (WHERE j.name = 'create-driver') AS cd_end,
                       min(j.started_at) FILTER (WHERE j.name <> 'create-driver') AS first,
                       max(j.finished_at) AS last
                FROM builds b JOIN build_jobs j ON j.build_id = b.id
                WHERE b.id = ANY($1::bigint[])
                GROUP BY b.id
                """,
                [pair.build_id for pair in self.pairs],
            )
        finally:
            await conn.close()
        by_id = {row["id"]: row for row in rows}
        for pair in self.pairs:
            row = by_id[pair.build_id]
            if row["status"] != "passed":
                raise BenchError(f"build {pair.build_id} is {row['status']}, not passed")
            pair.db = {
                "queued": (row["started_at"] - row["created_at"]).total_seconds(),
                "create-driver": (row["cd_end"] - row["started_at"]).total_seconds(),
                "jobs": (row["last"] - row["first"]).total_seconds(),
                "finish": (row["finished_at"] - row["last"]).total_seconds(),
            }


# ---------------------------------------------------------------- the engine alone


def engine_case(client: Any, runtime: str, disabled: bool, label: str) -> list[float]:
    """One container as the driver makes it (init, limits, log driver none, no-new-privileges),
    the script `true`; the seconds of create, attach, start, exit seen, remove, and the total."""
    options: dict[str, Any] = {"network_mode": "none", "runtime": runtime}
    if disabled:
        options["network_disabled"] = True
    t0 = time.monotonic()
    container = client.containers.create(
        IMAGE,
        entrypoint=["/bin/sh"],
        command=["-c", "true\n"],
        labels={BARE_LABEL: label},
        init=True,
        mem_limit=256 * 1024**2,
        memswap_limit=256 * 1024**2,
        nano_cpus=10**9,
        pids_limit=128,
        log_config=LogConfig(type="none"),
        security_opt=["no-new-privileges"],
        **options,
    )
    try:
        t1 = time.monotonic()
        stream = container.attach(stream=True)
        t2 = time.monotonic()
        container.start()
        t3 = time.monotonic()
        for _ in stream:
            pass
        stream.close()
        if container.wait()["StatusCode"] != 0:
            raise BenchError(f"the engine-only container ({runtime}) did not exit 0")
        t4 = time.monotonic()
    finally:
        container.remove(force=True)
    t5 = time.monotonic()
    return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0]


def engine_only(bench: Bench) -> list[tuple[str, list[float]]]:
    cases = [
        (f"{runtime}, {network}", runtime, network == "no engine network")
        for runtime in ("runc", "crun")
        for network in ("engine network none", "no engine network")
    ]
    times: dict[str, list[list[float]]] = {name: [] for name, _, _ in cases}
    for _ in range(bench.args.engine_rounds):
        for name, runtime, disabled in cases:
            times[name].append(engine_case(bench.client, runtime, disabled, bench.next_label()))
    return [
        (name, [statistics.median(c) for c in zip(*rows, strict=True)])
        for name, rows in times.items()
    ]


# ---------------------------------------------------------------- report


def report(bench: Bench, engine: list[tuple[str, list[float]]]) -> None:
    args = bench.args
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print()
    print(
        f"{args.jobs} jobs of `true` against {args.jobs} sequential"
        " `docker run --rm --network none`"
    )
    print(f"machine: {cpu_model()}, load average now {load}; {args.rounds} rounds")
    print(f"marid: docker.network {args.network}, runner.parallelism 1")
    print(
        f"{'variant':18} {'bare':>6} {'build':>6} {'ratio':>6}  {'queued':>6} {'create':>6} "
        f"{'jobs':>6} {'/job':>6} {'finish':>6}  others"
    )
    for variant in bench.variants:
        pairs = [pair for pair in bench.pairs if pair.variant == variant]

        def median(values: list[float]) -> float:
            return statistics.median(values)

        ratio = median([pair.ratio for pair in pairs])
        phase = {key: median([pair.db[key] for pair in pairs]) for key in pairs[0].db}
        others = median([pair.load.share("others") for pair in pairs])
        verdict = "meets" if ratio <= TARGET else "misses"
        print(
            f"{variant.name:18} {median([p.bare for p in pairs]):6.2f} "
            f"{median([p.build for p in pairs]):6.2f} {ratio:6.2f}  "
            f"{phase['queued']:6.3f} {phase['create-driver']:6.3f} {phase['jobs']:6.2f} "
            f"{phase['jobs'] / args.jobs * 1000:4.0f}ms {phase['finish']:6.3f}  {others:4.0%}"
            f"  {verdict} {TARGET}"
        )
    print("(seconds, medians over the rounds; ratio: median of the per-pair ratios build / bare)")
    if engine:
        print()
        print(f"the engine alone, one container, medians of {args.engine_rounds} (ms):")
        print(
            f"{'':34} {'create':>7} {'attach':>7} {'start':>7} {'exit':>7} {'remove':>7}"
            f" {'total':>7}"
        )
        for name, medians in engine:
            print(f"{name:34} " + " ".join(f"{value * 1000:7.0f}" for value in medians))


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    client = check_engine()
    stack.callback(client.close)
    runtimes = client.info().get("Runtimes") or {}
    if "crun" not in runtimes:
        raise BenchError("the engine has no crun runtime: run scripts/docker-up (it registers it)")
    directory, cluster = throwaway_cluster(stack, "marid-bench-multijob-")
    bench = Bench(args, directory, cluster, client)
    bench.start(stack)
    asyncio.run(bench.measure())
    engine = engine_only(bench) if args.engine_rounds else []
    report(bench, engine)


def main() -> None:
    args = parse_args()
    guarded(lambda stack: run(args, stack), DockerException, aiohttp.ClientError)


if __name__ == "__main__":
    sys.exit(main())
