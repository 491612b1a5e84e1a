"""Benchmark of a qemu build (issue 12): submit -> passed, the VM's boot apart from the jobs.

A throwaway PostgreSQL cluster (durable settings) holds one migrated database with one user
and a full-scope token. `marid serve` and `marid runner` run as separate processes on a
loopback free port, with `drivers: [qemu]` and `qemu_driver.images` a directory holding the
test image of scripts/qemu-test-image as the base image `bench/debian`. ROUNDS rounds in ABBA
order (a b, b a, ...), each timing:

(a) bare: what a hand-written script does for the same work, with no server or database: a
    qcow2 overlay on the image, qemu-system-x86_64 with the runner's flags (same accelerator,
    memory, CPUs, user-mode network with SSH forwarded on 127.0.0.1, keys by -fw_cfg), an SSH
    login retried until the guest answers, the build's three jobs as three commands on that
    connection, then qemu terminated;
(b) marid: one build of MANIFEST (the same three jobs, one artifact) from sending POST /builds
    to GET /b/<user>/<n> showing `passed`, split with the database's timestamps and the
    create-driver job's own line `The VM answered SSH in <s>s` into: queued (created -> the
    runner's claim), prepare (create-driver's start -> qemu started: image found, overlay,
    keys), boot (qemu started -> first SSH login), connect (login -> create-driver finished),
    jobs (first user job started -> last one finished), finish (-> the build finished) and
    seen (-> the client saw it; it polls every POLL seconds).

Prints each round with the machine's load average, then the medians. Everything it started is
stopped and removed on exit, Ctrl-C included.

    .venv/bin/python bench/qemu.py [--rounds N] [--memory 768m] [--cpus 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiohttp
import asyncpg
import asyncssh
from common import (
    BenchError,
    Process,
    cpu_model,
    create_database,
    guarded,
    marid_argv,
    throwaway_cluster,
    write_marid_config,
)

from marid import db, scopes, tokens, users
from marid.config import QemuDriverConfig
from marid.pgcluster import Cluster, free_port
from marid.runner.drivers.qemu import accelerator

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "marid_bench"
IMAGE = "bench/debian"
READY_TIMEOUT = 60.0  # seconds a process may take to start
BUILD_TIMEOUT = 600.0  # seconds one build may take, boot included
POLL = 0.1  # seconds between the client's GETs of the build
RUNNER_READY = "runner bench: drivers qemu"
JOBS = [
    "echo building; uname -r",
    "for i in 1 2 3 4 5; do echo line $i; done; nproc",
    "head -c 1000000 /dev/urandom > app.bin; ls -l app.bin",
]
MANIFEST = """\
driver: {{type: qemu, image: {image}}}
resources: {{memory: {memory}, cpus: "{cpus}"}}
stages: [build, test, package]
jobs:
- stage: build
  commands: ["{jobs[0]}"]
- stage: test
  commands: ["{jobs[1]}"]
- stage: package
  commands: ["{jobs[2]}"]
  artifacts: [app.bin]
"""
ANSWERED = re.compile(r"The VM answered SSH in ([0-9.]+)s")


@dataclass
class Round:
    kind: str  # "bare" or "marid"
    total: float
    parts: dict[str, float] = field(default_factory=dict)
    load: float = 0.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each kind (default 4)")
    parser.add_argument("--memory", default="768m", help="the VM's memory (default 768m)")
    parser.add_argument("--cpus", type=int, default=2, help="the VM's CPUs (default 2)")
    parser.add_argument("--log-level", default="warning", help="marid's logging.level")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not re.fullmatch(r"[0-9]+m", args.memory):
        parser.error("--memory must be a number of MiB such as 768m")
    return args


def test_image() -> Path:
    """The image of scripts/qemu-test-image (built first when not cached: about 2 minutes)."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "qemu-test-image")], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"scripts/qemu-test-image failed: {done.stderr.strip()[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


async def prepare(cluster: Cluster) -> str:
    """Create and migrate the database; returns the benchmark user's full-scope token."""
    await create_database(cluster, DATABASE)
    conn = await asyncpg.connect(cluster.dsn(DATABASE), server_settings={"timezone": "UTC"})
    try:
        await db.migrate(conn)
        user = await users.create(conn, "bench", "bench@example.com", "bench-password")
        _, value = await tokens.create(conn, user, "bench", scopes.FULL)
    finally:
        await conn.close()
    return value


# --- (a) bare -------------------------------------------------------------------------------


async def bare_round(image: Path, work: Path, memory: int, cpus: int) -> Round:
    """The same three jobs in a VM booted and driven by hand (see the module docstring)."""
    vm = work / f"bare-{time.monotonic_ns()}"
    vm.mkdir(parents=True)
    started = time.monotonic()
    try:
        await asyncio.to_thread(
            subprocess.run,
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image),
             str(vm / "disk.qcow2")],
            check=True, capture_output=True,
        )  # fmt: skip
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        (vm / "authorized_keys").write_bytes(client_key.export_public_key())
        (vm / "host_key").write_bytes(host_key.export_private_key())
        port = free_port()
        accel = accelerator("auto")
        argv = [
            "qemu-system-x86_64", "-no-user-config", "-nodefaults", "-accel", accel,
            "-cpu", "host" if accel == "kvm" else "max", "-m", str(memory), "-smp", str(cpus),
            "-display", "none", "-serial", f"file:{vm / 'console.log'}",
            "-drive", f"file={vm / 'disk.qcow2'},if=virtio,format=qcow2,cache=unsafe",
            "-nic", f"user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-fw_cfg", f"name=opt/marid/authorized_keys,file={vm / 'authorized_keys'}",
            "-fw_cfg", f"name=opt/marid/ssh_host_ed25519_key,file={vm / 'host_key'}",
        ]  # fmt: skip
        qemu = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        booting = time.monotonic()
        try:
            known = asyncssh.import_known_hosts(
                f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}"
            )
            conn = await _login(port, client_key, known, qemu)
            answered = time.monotonic()
            async with conn:
                for command in JOBS:
                    done = await conn.run(command, check=True)
                    assert done.stdout
            finished = time.monotonic()
        finally:
            if qemu.returncode is None:
                qemu.terminate()
            await qemu.wait()
        ended = time.monotonic()
    finally:
        shutil.rmtree(vm, ignore_errors=True)
    return Round(
        "bare",
        ended - started,
        {
            "prepare": booting - started,
            "boot": answered - booting,
            "jobs": finished - answered,
            "finish": ended - finished,
        },
    )


async def _login(
    port: int,
    key: asyncssh.SSHKey,
    known: asyncssh.SSHKnownHosts,
    qemu: asyncio.subprocess.Process,
) -> asyncssh.SSHClientConnection:
    deadline = time.monotonic() + BUILD_TIMEOUT
    while time.monotonic() < deadline:
        if qemu.returncode is not None:
            raise BenchError(f"qemu exited with status {qemu.returncode} while booting")
        try:
            return await asyncssh.connect(
                "127.0.0.1", port, username="root", client_keys=[key], known_hosts=known,
                connect_timeout=10, login_timeout=10,
            )  # fmt: skip
        except (OSError, TimeoutError, asyncssh.Error):
            await asyncio.sleep(0.25)
    raise BenchError(f"the bare VM did not answer SSH within {BUILD_TIMEOUT:.0f}s")


# --- (b) marid ------------------------------------------------------------------------------


async def marid_round(
    session: aiohttp.ClientSession, api: str, runner: Process, manifest: str
) -> Round:
    sent = time.monotonic()
    async with session.post(f"{api}/builds", json={"manifest": manifest}) as resp:
        if resp.status != 201:
            raise BenchError(f"POST /builds answered {resp.status}: {await resp.text()}")
        build = await resp.json()
    path = f"{api}/b/bench/{build['number']}"
    while True:
        runner.check_alive("during a build")
        async with session.get(path) as resp:
            build = await resp.json()
        if build["status"] not in ("queued", "running"):
            break
        if time.monotonic() - sent > BUILD_TIMEOUT:
            raise BenchError(f"build {build['number']} still {build['status']}")
        await asyncio.sleep(POLL)
    seen = time.monotonic()
    if build["status"] != "passed":
        raise BenchError(f"build {build['number']} ended {build['status']}:\n{build['output']}")
    async with session.get(f"{path}/jobs") as resp:
        jobs = await resp.json()
    setup, *work = jobs
    async with session.get(f"{path}/jobs/{setup['name']}/output") as resp:
        answered = ANSWERED.search(await resp.text())
    if answered is None:
        raise BenchError("the create-driver job did not say when the VM answered SSH")
    boot = float(answered.group(1))

    def at(value: str) -> float:
        return datetime.fromisoformat(value).timestamp()

    created, claimed, ended = (at(build[k]) for k in ("created_at", "started_at", "finished_at"))
    setup_start, setup_end = at(setup["started_at"]), at(setup["finished_at"])
    jobs_start, jobs_end = at(work[0]["started_at"]), at(work[-1]["finished_at"])
    return Round(
        "marid",
        seen - sent,
        {
            "queued": claimed - created,
            "prepare": (setup_end - setup_start) - boot,
            "boot": boot,
            "jobs": jobs_end - jobs_start,
            "finish": ended - jobs_end,
            "seen": max(0.0, (seen - sent) - (ended - created)),
        },
    )


# --- the run --------------------------------------------------------------------------------


def start_marid(
    stack: contextlib.ExitStack,
    directory: Path,
    cluster: Cluster,
    image: Path,
    args: argparse.Namespace,
) -> tuple[str, str, Process]:
    """serve and runner started; the API's URL, the token and the runner."""
    token = asyncio.run(prepare(cluster))
    images = directory / "images" / "bench"
    images.mkdir(parents=True)
    (images / "debian.qcow2").symlink_to(image)
    dsn, port = cluster.dsn(DATABASE), free_port()
    common = {
        "drivers": ["qemu"],
        "storage": {"path": str(directory / "blobs")},
        "logging": {"level": args.log_level},
        "limits": {"max": {"memory": "4g", "cpus": float(args.cpus)}},
    }
    serve_config = write_marid_config(directory / "serve.yml", dsn, port, **common)
    runner_config = write_marid_config(
        directory / "runner.yml",
        dsn,
        port,
        **{**common, "logging": {"level": "info"}},  # RUNNER_READY is an info line
        runner={"name": "bench", "parallelism": 1},
        qemu_driver={"images": str(directory / "images"), "work_dir": str(directory / "qemu")},
    )
    serve = Process("marid serve", marid_argv("serve", serve_config), directory / "serve.log")
    runner = Process("marid runner", marid_argv("runner", runner_config), directory / "runner.log")
    stack.callback(serve.stop)
    stack.callback(runner.stop)
    serve.start()
    runner.start()
    runner.wait_for_line(RUNNER_READY, READY_TIMEOUT)
    return f"http://127.0.0.1:{port}/api", token, runner


async def measure(
    api: str, token: str, runner: Process, image: Path, directory: Path, args: argparse.Namespace
) -> list[Round]:
    memory = int(args.memory.removesuffix("m"))
    manifest = MANIFEST.format(image=IMAGE, memory=args.memory, cpus=args.cpus, jobs=JOBS)
    headers = {"Authorization": f"Bearer {token}"}
    rounds: list[Round] = []
    async with aiohttp.ClientSession(headers=headers) as session:
        await _wait_for_api(session, api)
        order = [
            kind
            for i in range(args.rounds)
            for kind in (("bare", "marid"), ("marid", "bare"))[i % 2]
        ]
        for kind in order:
            if kind == "bare":
                done = await bare_round(image, directory / "bare", memory, args.cpus)
            else:
                done = await marid_round(session, api, runner, manifest)
            done.load = os.getloadavg()[0]
            rounds.append(done)
            print(_line(done), flush=True)
    return rounds


async def _wait_for_api(session: aiohttp.ClientSession, api: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{api}/user") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise BenchError(f"the API did not answer within {READY_TIMEOUT:.0f}s")


def _line(done: Round) -> str:
    parts = "  ".join(f"{name} {value:6.2f}" for name, value in done.parts.items())
    return f"{done.kind:5}  total {done.total:6.2f}s  {parts}  load {done.load:.2f}"


def report(rounds: list[Round], args: argparse.Namespace) -> None:
    print()
    print(f"medians of {args.rounds} rounds each ({args.memory}, {args.cpus} CPUs,"
          f" {accelerator('auto')}):")  # fmt: skip
    for kind in ("bare", "marid"):
        mine = [r for r in rounds if r.kind == kind]
        names = list(mine[0].parts)
        medians = {name: statistics.median(r.parts[name] for r in mine) for name in names}
        total = statistics.median(r.total for r in mine)
        parts = "  ".join(f"{name} {value:.2f}" for name, value in medians.items())
        print(f"  {kind:5}  total {total:.2f}s  ({parts})")
    bare = statistics.median(r.total for r in rounds if r.kind == "bare")
    marid = statistics.median(r.total for r in rounds if r.kind == "marid")
    print(f"  marid - bare: {marid - bare:+.2f}s ({marid / bare:.2f}x)")


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    missing = [p for p in ("qemu-system-x86_64", "qemu-img", "setpriv") if not shutil.which(p)]
    if missing:
        raise BenchError(f"needs {', '.join(missing)} (apt-get install qemu-system-x86 qemu-utils)")
    image = test_image()
    accel = accelerator(QemuDriverConfig().accel)
    print(f"qemu build bench: {cpu_model()}, {os.cpu_count()} CPUs, accelerator {accel},"
          f" image {image.name}")  # fmt: skip
    directory, cluster = throwaway_cluster(stack, "marid-bench-qemu-")
    api, token, runner = start_marid(stack, directory, cluster, image, args)
    rounds = asyncio.run(measure(api, token, runner, image, directory, args))
    report(rounds, args)


def main() -> None:
    args = parse_args()
    guarded(lambda stack: run(args, stack), aiohttp.ClientError, asyncssh.Error)


if __name__ == "__main__":
    main()
