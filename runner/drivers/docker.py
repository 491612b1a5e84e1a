"""The docker driver (docs/manifest.md §9.2): one volume per build, one container per job.

A job's container is made and started before its turn, while the jobs before it run
(docker.prepare_ahead of them, as Driver.expect announced), its shell held on its standard
input until run() releases it: a job waits for its container only if its turn comes before
the container is up (issue 14, bench/README.md).

Every container it makes runs with `no-new-privileges` and without the capabilities of
`docker.cap_drop`, under `docker.runtime` (else crun when the engine has it); with
`docker.network: build` the job containers join a bridge network of the attempt's own
(docs/security.md §2), with `none` no engine network at all.

The docker SDK is blocking: every call runs in a worker thread (`asyncio.to_thread`), except
the output stream of a running job, which gets a thread of its own (see `_pump`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import posixpath
import re
import secrets
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.networks import Network
from docker.types import LogConfig
from docker.types.daemon import CancellableStream
from requests import RequestException

from marid.config import DEFAULT_CAP_DROP
from marid.manifest import format_size
from marid.runner.drivers.base import (
    Capped,
    Driver,
    DriverError,
    Exit,
    Limits,
    OutputSink,
    SshKey,
    Upcoming,
    exited,
)

log = logging.getLogger(__name__)

LABEL_BUILD = "marid.build"
LABEL_ATTEMPT = "marid.attempt"
# Which marid installation (database) a container belongs to: several may share an engine,
# and their build ids overlap.
LABEL_INSTANCE = "marid.instance"
# Loaded uploads are tagged `marid-cache/sha256:<archive sha256>`: the cache key of h.2 step 1.
CACHE_REPOSITORY = "marid-cache/sha256"
SCRIPT_PATH = "/.marid/job.sh"  # outside any sensible workspace
KEPT_MOUNT = "/.marid-kept"  # where a resumed build's copy reads the kept volume
# Scripts up to this size go to /bin/sh as `-c SCRIPT`: copying a file into a container
# (put_archive) costs the engine ~50 ms of CPU per job (bench/README.md). Linux caps one
# argument at 128 KiB, so larger scripts are still copied in.
INLINE_SCRIPT_MAX = 64 * 1024
# A job container's shell is started held: it waits for this line on its standard input (which
# the driver writes when run() is called for the job) before it runs the job script, so that a
# container can be made and started while the job before runs (docs/manifest.md §9.2). Any
# other input, or none (the runner died), ends it without running anything.
RELEASE = b"run\n"
HOLD = 'IFS= read -r go && [ "$go" = run ] || exit 1; {}exec "$0" "$@" </dev/null'
# With docker.network none the engine makes no network for a job container (it still gets a
# network namespace of its own, loopback only) and so writes no /etc/hosts: the held shell
# writes what the engine would, unless the image has one.
HOSTS = (
    '{ [ -s /etc/hosts ] || printf "127.0.0.1\\tlocalhost\\n'
    '::1\\tlocalhost ip6-localhost ip6-loopback\\n" >/etc/hosts; } 2>/dev/null; '
)
# The OCI runtime used when docker.runtime is not set and the engine has it: it starts a
# container in less time and CPU than runc (bench/README.md, multi-job builds).
FAST_RUNTIME = "crun"
RUNTIMES_TTL = 60.0  # seconds the engine's list of runtimes is reused for
STOP_TIMEOUT = 10  # seconds between SIGTERM and SIGKILL (docs/manifest.md §6.10)
STOPPED_STATUS = 128 + 9  # what `run` returns for a job that a stop() kept from starting
# A job's output still arriving after it was stopped is passed on for this long (seconds).
DRAIN = 1.0
# `docker stop` logs its `stop` event just after the container's `die`: how long past the
# container's end (seconds) its events are read for one (see _stopped_from_outside).
STOP_EVENT_GRACE = 2
REMOVED = "container removed by someone else"  # docs/manifest.md §6.8
NOT_FOUND = (
    "image {} not found: upload it with POST /images (driver docker) or load it on the runner"
)
NEVER_PULLED = " (this runner pulls no images: {} is never)"
# What a build naming another's uploaded image is told (issue 11 row 12): as little as for any
# image it may not use, so that it learns nothing of the upload.
NOT_AVAILABLE = "image {} is not available to this build"
# docker.network: a user-defined bridge network made for each attempt, labelled like its
# containers: its jobs reach neither other builds' containers nor the engine's default bridge.
BUILD_NETWORK = "build"
# Given to every container: no setuid binary or file capability raises a job's privileges.
SECURITY_OPT = ["no-new-privileges"]
SSH_DIR = "/root/.ssh"
SSH_CONFIG_HEAD = "\nStrictHostKeyChecking no\nUserKnownHostsFile /dev/null\n\n"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class UploadedImage:
    """An uploaded `docker save` archive named like the build's image (h.2 resolution, step 1)."""

    digest: str  # sha256 of the archive, lowercase hex (an optional `sha256:` prefix is allowed)
    fetch: Callable[[Path], Awaitable[None]]  # writes the archive to the given local file


@dataclass(frozen=True)
class _File:
    path: str  # absolute, normalised, in the container
    data: bytes
    mode: int


@dataclass
class _Held:
    """A job container whose shell waits for RELEASE, and its two attached streams."""

    container: Any
    output: Any  # stdout and stderr, attached before the start so that none is missed
    stdin: Any  # a socket; RELEASE is written to it, then it is closed
    started: bool  # False when a stop() came before the start


@dataclass
class _Next:
    """A job expect() announced, and once it is being prepared, the making of its container."""

    upcoming: Upcoming
    making: asyncio.Task[_Held] | None = None


def docker_client(host: str) -> docker.DockerClient:
    """A client for the engine at `host` (config `docker.host`); raises DockerException if down."""
    return docker.DockerClient(base_url=host)


async def remove_leftovers(client: docker.DockerClient, build_id: int, instance: str = "") -> None:
    """Remove every container, volume and network of `build_id` (any attempt) of this
    installation. Never raises."""
    labels = [f"{LABEL_BUILD}={build_id}", f"{LABEL_INSTANCE}={instance}"]
    await asyncio.to_thread(_remove_labelled, client, labels)


class DockerDriver(Driver):
    """Runs one build's jobs in containers of one image, sharing one workspace volume."""

    def __init__(
        self,
        client: docker.DockerClient,
        build_id: int,
        attempt: int,
        image: str,
        workspace: str,
        limits: Limits,
        network: str | None,
        pull: str,
        uploaded: Callable[[str], Awaitable[UploadedImage | None]],
        instance: str = "",
        pull_setting: str = "docker.pull",
        runtime: str | None = None,
        cap_drop: list[str] | None = None,
        prepare_ahead: int = 2,
    ) -> None:
        self._client = client
        self._instance = instance
        self.build_id = build_id
        self._image = image
        self._workspace = _absolute(workspace)
        self._limits = limits
        self._network = network  # docker.network: BUILD_NETWORK, a network's name, none or None
        self._runtime = runtime  # docker.runtime; None: FAST_RUNTIME if the engine has it
        self._prepare_ahead = prepare_ahead  # docker.prepare_ahead: containers made ahead
        self._next: list[_Next] = []  # the jobs run() is expected for, in order
        self._cap_drop = list(DEFAULT_CAP_DROP if cap_drop is None else cap_drop)
        self._pull = pull  # docker.pull: never, if-not-present or always (docs/configuration.md)
        self._pull_setting = pull_setting  # where the policy came from, for the messages
        self._uploaded = uploaded
        self._labels = {
            LABEL_BUILD: str(build_id),
            LABEL_ATTEMPT: str(attempt),
            LABEL_INSTANCE: instance,
        }
        # Names must be unique on the engine, which other installations may share: the labels,
        # not the names, say what belongs to whom.
        self._prefix = f"marid-{build_id}-{attempt}-{secrets.token_hex(4)}"
        self._image_id: str | None = None
        self._helper: Any = None  # created, never started: writes into the volume
        # With docker.network build: the container that alone joins the build's network, and
        # whose network namespace every job container shares (see _create_sandbox).
        self._sandbox: Any = None
        self._extra_files: list[_File] = []  # copied into every job container
        self._jobs = 0
        self._last: Any = None  # the last job's container, kept for `collect`
        self._running: Any = None
        self._stopped = False
        self._start_lock = asyncio.Lock()  # orders a job's release against stop()
        self._making: set[asyncio.Future[Any]] = set()  # see _make
        self._holding: set[asyncio.Task[_Held]] = set()  # containers being made and held
        # Streams of job containers not closed yet: run() closes its own job's, destroy() those
        # of prepared jobs that never ran and any left by a run() that was cancelled.
        self._streams: list[Any] = []

    @property
    def volume(self) -> str:
        """The name of the build's workspace volume."""
        return self._prefix

    @property
    def network(self) -> str | None:
        """The network job containers join: the build's own with BUILD_NETWORK, else
        docker.network (None: the engine's default)."""
        return self._prefix if self._network == BUILD_NETWORK else self._network

    async def clear_previous(self) -> None:
        """Remove containers, volumes and networks of this build's earlier attempts."""
        await remove_leftovers(self._client, self.build_id, self._instance)

    async def create(self, out: OutputSink) -> None:
        """Check docker.runtime (or, without one, look for FAST_RUNTIME), resolve the image
        (h.2), then create the workspace volume and, with docker.network `build`, the build's
        network."""
        if self._runtime is not None:
            await asyncio.to_thread(self._check_runtime, self._runtime)
        elif FAST_RUNTIME in await asyncio.to_thread(_runtimes, self._client):
            self._runtime = FAST_RUNTIME
        self._image_id = await self._resolve_image(out)
        await self._make(self._client.volumes.create, self.volume, labels=self._labels)
        log.info("build %d: created volume %s", self.build_id, self.volume)
        if self.start_from is not None:
            await self._make(self._copy_kept, self.start_from)
            await out(f"Copied the kept workspace {self.start_from} into {self.volume}\n".encode())
        if self._network == BUILD_NETWORK:
            await self._make(self._create_network)
            log.info("build %d: created network %s", self.build_id, self._prefix)
            self._sandbox = await self._make(self._create_sandbox)

    def _check_runtime(self, runtime: str) -> None:
        """Raise DriverError naming docker.runtime unless the engine knows `runtime`: else
        every container would fail to be created with the engine's terse "Unknown runtime"."""
        runtimes = sorted(_engine(self._client.info).get("Runtimes") or {})
        if runtime not in runtimes:
            known = ", ".join(runtimes) or "none"
            raise DriverError(
                f"docker.runtime {runtime!r} is not a runtime of this runner's Docker engine"
                f" (it has: {known})"
            )

    def _create_network(self) -> Any:
        """The build's own bridge network; DriverError saying so when the engine cannot make
        one (e.g. its address pools are used up: docs/security.md §2)."""
        try:
            return self._client.networks.create(self._prefix, driver="bridge", labels=self._labels)
        except DockerException as exc:
            raise DriverError(
                f"docker.network build: the engine could not create this build's network:"
                f" {_reason(exc)}"
            ) from exc

    def _create_sandbox(self) -> Any:
        """Start the build's network sandbox: a container of the build's image whose shell
        only waits on its standard input (closed when the attempt ends, which ends it), joined
        to the build's network. The job containers join its network namespace instead of the
        network, so that the engine connects the build to its bridge once, not once per job
        (~0.4 s each, one at a time: bench/README.md, multi-job builds). Each job keeps its own
        processes, file system and environment; the jobs of one build share the network as
        before, and nothing else can join it."""
        sandbox = _engine(
            self._client.containers.create,
            self._require_image(),
            entrypoint=["/bin/sh"],
            command=["-c", "IFS= read -r _; exit 0"],
            stdin_open=True,
            name=f"{self._prefix}-net",
            labels={**self._labels, "marid.role": "network"},
            network=self.network,
            mem_limit=self._limits.memory,
            memswap_limit=self._limits.memory,
            pids_limit=self._limits.pids,
            log_config=LogConfig(type="none"),
            security_opt=SECURITY_OPT,
            cap_drop=self._cap_drop,
            **({} if self._runtime is None else {"runtime": self._runtime}),
        )
        stdin = _engine(
            self._client.api.attach_socket, sandbox.id, params={"stdin": 1, "stream": 1}
        )
        self._streams.append(stdin)
        _engine(sandbox.start)
        return sandbox

    async def place_object(self, content: Path, destination: str) -> str:
        """Place a file (0644): in the volume now if inside the workspace, else in each job."""
        data = await asyncio.to_thread(content.read_bytes)
        return await self._place(_File(self._path(destination), data, 0o644))

    async def write_keys(self, keys: list[SshKey]) -> dict[str, str]:
        """Write each key and the SSH config (docs/manifest.md §6.5) for every job container."""
        if not keys:
            return {}
        ordered = sorted(keys, key=lambda key: key.name)
        config = SSH_CONFIG_HEAD + "".join(key.config + "\n" for key in ordered)
        files = [_File(f"{SSH_DIR}/{key.name}", key.private_key.encode(), 0o600) for key in ordered]
        files.append(_File(f"{SSH_DIR}/config", config.encode(), 0o600))
        for file in files:
            await self._place(file)
        return {key.name: f"{SSH_DIR}/{key.name}" for key in ordered}

    def expect(self, jobs: list[Upcoming]) -> None:
        """Note the jobs to come: from the first run() on, the containers of the next
        docker.prepare_ahead of them are made and started, held, while the job before runs."""
        self._next = [_Next(upcoming) for upcoming in jobs]

    async def run(self, job: str, script: str, env: dict[str, str], out: OutputSink) -> Exit:
        """Release `script` in its container (made now, or ahead while the previous job ran),
        streaming its output; returns how it ended."""
        previous, self._last = self._last, None
        if self._stopped:
            await self._remove(previous)
            return exited(STOPPED_STATUS)
        making = self._take(Upcoming(job, script, env))
        self._prepare()
        # The previous container goes while this one is made or released.
        _, held = await asyncio.gather(self._remove(previous), making)
        self._last = held.container
        try:
            if not await self._release(held):
                return exited(STOPPED_STATUS)
            await _pump(held.output, out, held.container.name, lambda: self._close(held))
            ending = await asyncio.to_thread(self._ending, held.container)
        finally:
            self._running = None
            await asyncio.to_thread(self._close, held)
        if ending.reason == REMOVED:
            self._last = None  # nothing left to collect artifacts from
        log.info("build %d: job %s: %s", self.build_id, job, ending.reason or "exit status 0")
        return ending

    def _ending(self, container: Any) -> Exit:
        """How the job in `container` ended, once it has (docs/manifest.md §6.8)."""
        try:
            status = int(container.wait()["StatusCode"])
            attrs = self._client.api.inspect_container(container.id)
        except NotFound:
            return Exit(None, REMOVED)
        except DockerException as exc:
            raise DriverError(_reason(exc)) from exc
        state = attrs["State"]
        if state["Status"] in ("removing", "dead"):  # `docker rm -f` sets it before its kill
            return Exit(None, REMOVED)  # as when it is gone already: the status is its kill's
        if state["OOMKilled"] and status != 0:  # a job may survive a killed command
            return Exit(status, f"out of memory (limit {format_size(self._limits.memory)})")
        if status > 128 and not self._stopped and self._stopped_from_outside(container, state):
            return Exit(status, f"container stopped from outside (exit {status})")
        return exited(status)

    def _stopped_from_outside(self, container: Any, state: dict[str, Any]) -> bool:
        """Whether `docker stop` (or the engine API's stop) ended `container`, which only the
        engine's events tell: a stop sends signals (`kill` events), and logs `stop` just after
        the container's `die`. So events are read until a `die` that no `kill` came before, a
        `stop`, or STOP_EVENT_GRACE seconds past the container's end. Best effort: the engine
        replays only its last 256 events."""
        events, killed = None, False
        try:
            events = self._client.events(
                since=_seconds(state["StartedAt"]),
                until=_seconds(state["FinishedAt"]) + 1 + STOP_EVENT_GRACE,
                filters={"type": "container", "container": container.id},
                decode=True,
            )
            for event in events:
                action = event.get("Action")
                if action == "stop":
                    return True
                if action == "die" and not killed:
                    return False  # signalled from inside the container, not by the engine
                killed = killed or action == "kill"
        except (DockerException, RequestException) as exc:
            log.warning("build %d: events of %s: %s", self.build_id, container.name, exc)
        finally:
            if events is not None:
                _close_stream(events)
        return False

    async def collect(self, source: str, destination: Path, max_size: int) -> None:
        """Copy the regular file `source` out of the last job's container."""
        if self._last is None:
            raise DriverError(f"{source}: no job container to collect from")
        await asyncio.to_thread(self._collect, source, destination, max_size)

    async def archive(self, paths: list[str], destination: Path, max_size: int) -> list[str]:
        """The cache's tar, read from the volume through the helper container (docs/manifest.md
        §10)."""
        if self._helper is None:
            self._helper = await self._make(self._create_helper)
        return await asyncio.to_thread(
            _cache_archive, self._helper, self._path, paths, destination, max_size
        )

    async def extract(self, archive: Path) -> None:
        """Unpack the cache into the volume through the helper container; the engine keeps
        every member inside the container, and only the volume outlives it."""
        if self._helper is None:
            self._helper = await self._make(self._create_helper)
        with archive.open("rb") as file:
            await asyncio.to_thread(_engine, self._helper.put_archive, self._workspace, file)

    async def stop(self) -> None:
        """Stop the running job container (SIGTERM, SIGKILL after 10 s); later runs don't start,
        and no held container is released."""
        self._stopped = True
        async with self._start_lock:  # a start in progress finishes first, then gets stopped
            container = self._running
        if container is None:
            return
        try:
            await asyncio.to_thread(container.stop, timeout=STOP_TIMEOUT)
        except NotFound:
            pass
        except DockerException as exc:
            log.warning("build %d: stopping %s failed: %s", self.build_id, container.name, exc)

    async def destroy(self) -> None:
        """Remove this attempt's containers (held ones too: their jobs never run), volume and
        network (by label), once every engine call that makes one has returned. Never raises."""
        await self._remove_made(volumes=True)

    async def keep(self) -> str | None:
        """Remove this attempt's containers (held ones unrun) and network, keep its workspace
        volume (docs/api.md §27): its name. The runners' reapers remove it once it is no longer
        kept."""
        await self._remove_made(volumes=False)
        return self.volume

    async def _remove_made(self, volumes: bool) -> None:
        self._stopped = True
        self._next = []
        holding = set(self._holding)
        for making in holding:  # no further step: each stops at its current engine call
            making.cancel()
        if holding:
            await asyncio.wait(holding)
        while self._making:  # calls a kill or timeout cancelled the caller of (see _make)
            await asyncio.wait(set(self._making))
        await asyncio.to_thread(self._close_streams)
        labels = [f"{key}={value}" for key, value in self._labels.items()]
        await asyncio.to_thread(_remove_labelled, self._client, labels, volumes)
        self._last = self._helper = self._sandbox = None

    def _copy_kept(self, source: str) -> None:
        """Fill the new workspace volume with a copy of the volume `source` that `keep` left,
        with `cp -a` as root in a container of the build's image (its jobs run /bin/sh, and
        every such image has cp), networking off. Raises DriverError."""
        try:
            self._client.volumes.get(source)
        except NotFound:
            raise DriverError(f"the kept workspace {source} is gone") from None
        mounts = {
            source: {"bind": KEPT_MOUNT, "mode": "ro"},
            self.volume: {"bind": self._workspace, "mode": "rw"},
        }
        container = _engine(
            self._client.containers.create,
            self._require_image(),
            ["/bin/sh", "-c", f'cp -a {KEPT_MOUNT}/. "$0"', self._workspace],
            entrypoint=[],
            name=f"{self._prefix}-copy",
            user="0:0",
            volumes=mounts,
            labels=self._labels,
            network_mode="none",
            security_opt=SECURITY_OPT,
            cap_drop=self._cap_drop,
            runtime=self._runtime,
            mem_limit=self._limits.memory,
            pids_limit=self._limits.pids,
        )
        try:
            _engine(container.start)
            status = int(_engine(container.wait)["StatusCode"])
            if status != 0:
                said = _engine(container.logs).decode(errors="replace").strip()[-500:]
                raise DriverError(f"copying the kept workspace {source} failed: {said}")
        finally:
            with contextlib.suppress(DockerException):
                container.remove(force=True)

    async def _resolve_image(self, out: OutputSink) -> str:
        """The ID of the image to run, following docs/manifest.md §9.2 resolution."""
        name = self._image
        upload = await self._uploaded(name)
        if upload is not None:
            return await self._use_upload(upload, out)
        if _repository(name) == CACHE_REPOSITORY:  # uploads are reached through their names
            raise DriverError(NOT_AVAILABLE.format(name))
        # docker.pull (docs/configuration.md): `always` pulls even an image the engine has.
        image: Any = None
        if self._pull != "always":
            image = await asyncio.to_thread(self._find_image, name)
        if image is None and self._pull == "never":
            raise DriverError(NOT_FOUND.format(name) + NEVER_PULLED.format(self._pull_setting))
        if image is None:
            await out(f"Pulling image {name} ({self._pull_setting} is {self._pull})\n".encode())
            image, status = await asyncio.to_thread(_pull, self._client, name)
            if status:
                await out(f"{status}\n".encode())
        if not _public(image):  # e.g. named by its ID: an upload the engine holds for others
            raise DriverError(NOT_AVAILABLE.format(name))
        await out(f"Using image {name} ({image.id})\n".encode())
        return str(image.id)

    async def _use_upload(self, upload: UploadedImage, out: OutputSink) -> str:
        """The ID of the uploaded image, loaded into the engine unless already cached."""
        digest = upload.digest.removeprefix("sha256:")
        if not _SHA256.fullmatch(digest):
            raise DriverError(f"uploaded image {self._image}: invalid digest {upload.digest!r}")
        tag = f"{CACHE_REPOSITORY}:{digest}"
        image = await asyncio.to_thread(self._find_image, tag)
        if image is None:
            await out(f"Loading uploaded image {self._image} (sha256:{digest})\n".encode())
            image = await self._load(upload, digest)
        await out(f"Using uploaded image {self._image} ({image.id})\n".encode())
        return str(image.id)

    async def _load(self, upload: UploadedImage, digest: str) -> Any:
        """Fetch the archive, load it without its tags, tag it for the cache; returns the image."""
        directory = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="marid-image-"))
        try:
            archive = directory / "archive.tar"
            await upload.fetch(archive)
            return await asyncio.to_thread(self._load_archive, archive, directory, digest)
        finally:
            await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)

    def _load_archive(self, archive: Path, directory: Path, digest: str) -> Any:
        if _sha256(archive) != digest:
            raise DriverError(
                f"uploaded image {self._image}: the archive does not match its digest"
            )
        untagged = directory / "untagged.tar"
        try:
            _strip_tags(archive, untagged, self._image)
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise DriverError(f"uploaded image {self._image}: {exc}") from exc
        start = time.monotonic()
        with untagged.open("rb") as stream:
            images = _engine(self._client.images.load, stream)
        if len(images) != 1:
            raise DriverError(f"uploaded image {self._image}: loaded {len(images)} images, not 1")
        _engine(images[0].tag, CACHE_REPOSITORY, digest)
        log.info("loaded %s as %s in %.1fs", self._image, digest, time.monotonic() - start)
        return images[0]

    def _find_image(self, name: str) -> Any:
        """The engine's image called `name`, or None."""
        try:
            return self._client.images.get(name)
        except ImageNotFound:
            return None
        except DockerException as exc:
            raise DriverError(f"image {name}: {_reason(exc)}") from exc

    async def _place(self, file: _File) -> str:
        """Write `file` into the volume, or check it in the helper and keep it for every job."""
        if self._helper is None:
            self._helper = await self._make(self._create_helper)
        await asyncio.to_thread(_engine, self._helper.put_archive, "/", _tar([file]))
        if not self._in_workspace(file.path):
            self._extra_files.append(file)
        return file.path

    def _create_helper(self) -> Any:
        return _engine(
            self._client.containers.create,
            self._require_image(),
            entrypoint=["/bin/sh"],
            name=f"{self._prefix}-files",
            labels=self._labels,
            network_mode="none",
            volumes={self.volume: {"bind": self._workspace, "mode": "rw"}},
            security_opt=SECURITY_OPT,
            cap_drop=self._cap_drop,
        )

    def _take(self, upcoming: Upcoming) -> asyncio.Task[_Held]:
        """The making of `upcoming`'s container: the one prepared ahead, else a new one. Jobs
        expected before it will not run: their held containers wait for destroy()."""
        for index, expected in enumerate(self._next):
            if expected.upcoming == upcoming:
                del self._next[: index + 1]
                return expected.making or self._hold(upcoming)
        return self._hold(upcoming)

    def _prepare(self) -> None:
        """Start making the containers of the next docker.prepare_ahead expected jobs."""
        for expected in self._next[: self._prepare_ahead]:
            if expected.making is None:
                expected.making = self._hold(expected.upcoming)

    def _hold(self, upcoming: Upcoming) -> asyncio.Task[_Held]:
        self._jobs += 1
        task = asyncio.ensure_future(self._made_and_held(upcoming, f"{self._prefix}-{self._jobs}"))
        self._holding.add(task)
        task.add_done_callback(self._holding.discard)
        task.add_done_callback(_retrieve)  # a held job that never runs: its error is nobody's
        return task

    async def _made_and_held(self, upcoming: Upcoming, name: str) -> _Held:
        """Create, attach to and start a job's container, its shell held until _release()."""
        held = await self._make(self._create_job, upcoming, name)
        if not self._stopped:  # a job that cannot run any more needs no start
            await self._make(held.container.start)
            held.started = True
        return held

    async def _release(self, held: _Held) -> bool:
        """Let the held job run unless stop() came first; returns whether it runs."""
        async with self._start_lock:
            if self._stopped or not held.started:
                return False
            await asyncio.to_thread(_send_release, held.stdin)
            self._running = held.container
        return True

    def _create_job(self, upcoming: Upcoming, name: str) -> _Held:
        """A created job container holding the script and the files kept for every job, and
        its streams: output, and the standard input its held shell waits on."""
        network: dict[str, Any] = {} if self.network is None else {"network_mode": self.network}
        if self._sandbox is not None:  # the build's network, through its sandbox's namespace
            network = {"network_mode": f"container:{self._sandbox.id}"}
        elif self._network == "none":
            # No engine network: the engine then skips its network set-up (a prestart hook that
            # re-executes dockerd, ~100 ms a container). The namespace is still the
            # container's own, with only a loopback interface, as with the `none` network.
            network["network_disabled"] = True
        runtime = {} if self._runtime is None else {"runtime": self._runtime}
        script = upcoming.script.encode()
        inline = len(script) <= INLINE_SCRIPT_MAX
        # The trailing newline keeps the shell from exec-ing the last command, as when it
        # reads a file: it stays to report a killed command ("Killed").
        job = ["-c", script.decode().rstrip("\n") + "\n"] if inline else [SCRIPT_PATH]
        # An unheld shell would see no SHLVL of the engine's; the held one must not pass its own on.
        unset = "" if "SHLVL" in upcoming.env else "unset SHLVL; "
        hold = (HOSTS if self._network == "none" else "") + HOLD.format(unset)
        container = _engine(
            self._client.containers.create,
            self._require_image(),
            entrypoint=["/bin/sh"],
            command=["-c", hold, "/bin/sh", *job],
            stdin_open=True,  # and StdinOnce: the engine closes it once RELEASE was sent
            name=name,
            labels={**self._labels, "marid.job": upcoming.job},
            environment=upcoming.env,
            working_dir=self._workspace,
            volumes={self.volume: {"bind": self._workspace, "mode": "rw"}},
            mem_limit=self._limits.memory,
            memswap_limit=self._limits.memory,  # equal to memory: no swap on top (h.1)
            nano_cpus=int(self._limits.cpus * 1e9),
            pids_limit=self._limits.pids,
            # An init as PID 1 passes SIGTERM on to the shell: a shell as PID 1 ignores it, so
            # stop() would always wait the full 10 s for SIGKILL.
            init=True,
            # The output is streamed through attach; engine-side logs would only duplicate it.
            log_config=LogConfig(type="none"),
            security_opt=SECURITY_OPT,
            cap_drop=self._cap_drop,
            **network,
            **runtime,
        )
        files = [*self._extra_files]
        if not inline:
            files.append(_File(SCRIPT_PATH, script, 0o644))
        if files:
            _engine(container.put_archive, "/", _tar(files))
        output = _engine(container.attach, stream=True)
        self._streams.append(output)
        params = {"stdin": 1, "stream": 1}
        stdin = _engine(self._client.api.attach_socket, container.id, params=params)
        self._streams.append(stdin)
        return _Held(container, output, stdin, started=False)

    def _collect(self, source: str, destination: Path, max_size: int) -> None:
        chunks = self._archive(source)
        try:
            with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(chunks)), mode="r|") as tar:
                content = _artifact(source, tar, max_size)
                with destination.open("wb") as file:
                    shutil.copyfileobj(content, file)
        except (tarfile.TarError, OSError) as exc:
            destination.unlink(missing_ok=True)
            raise DriverError(f"{source}: {exc}") from exc

    def _archive(self, source: str) -> Iterator[bytes]:
        """The streamed tar of `source` in the last job's container, a symlink followed."""
        try:
            chunks, stat = self._last.get_archive(self._path(source))
            if stat.get("linkTarget"):  # fully resolved by the engine, as for `docker cp -L`
                chunks, stat = self._last.get_archive(stat["linkTarget"])
        except NotFound as exc:
            raise DriverError(f"{source}: no such file") from exc
        except DockerException as exc:
            raise DriverError(f"{source}: {_reason(exc)}") from exc
        return iter(chunks)

    async def _make(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`call(*args, **kwargs)` in a worker thread, for the calls that create or start a
        container, or create the volume or the network.

        A kill or timeout cancels the job's task (docs/architecture.md), but not a thread: the
        engine call goes on, and what it makes would appear after destroy() had looked for it,
        never to be removed. So these calls are tracked until they return, and destroy() waits
        for them.
        """
        future = asyncio.ensure_future(asyncio.to_thread(_engine, call, *args, **kwargs))
        self._making.add(future)
        future.add_done_callback(self._making.discard)
        future.add_done_callback(_retrieve)
        return await asyncio.shield(future)

    def _close_streams(self) -> None:
        """Close the streams still open (in a worker thread: run() and destroy() may both be
        closing)."""
        while True:
            try:
                stream = self._streams.pop()
            except IndexError:
                return
            _close_stream(stream)

    def _close(self, held: _Held) -> None:
        """Close the streams of one job's container, unless destroy() already has."""
        for stream in (held.output, held.stdin):
            try:
                self._streams.remove(stream)
            except ValueError:
                continue
            _close_stream(stream)

    async def _remove(self, container: Any) -> None:
        """Remove a finished job's container, if any (its artifacts are collected by now)."""
        if container is None:
            return
        try:
            await asyncio.to_thread(container.remove, force=True)
        except DockerException as exc:  # destroy() retries by label
            log.warning("build %d: removing %s failed: %s", self.build_id, container.name, exc)

    def _path(self, path: str) -> str:
        """`path` made absolute in the container: relative paths are in the workspace."""
        return _absolute(posixpath.join(self._workspace, path))

    def _in_workspace(self, path: str) -> bool:
        return path.startswith(self._workspace.rstrip("/") + "/")

    def _require_image(self) -> str:
        if self._image_id is None:
            raise DriverError("the docker driver was not created")
        return self._image_id


async def _pump(
    stream: Iterator[bytes], out: OutputSink, name: str, close: Callable[[], None]
) -> None:
    """Hand each chunk of `stream` to `out` as it arrives, until the stream ends.

    The blocking read gets a thread of its own rather than one of asyncio's default workers:
    a job holds it for its whole run, and concurrent builds would otherwise starve the pool
    that every other SDK call (stop() included) needs.

    Cancelled (a kill or time limit, once the container was stopped), it still passes on what
    the stream holds for up to DRAIN seconds, then `close`s it; either way no output reaches
    `out` after it returns, so the line saying why the job ended comes last (docs/manifest.md
    §6.8).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finish(exc: BaseException | None) -> None:
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    async def deliver(chunk: bytes) -> None:
        await out(chunk)  # `out` may return any awaitable; threads can only submit coroutines

    def read() -> None:
        try:
            for chunk in stream:
                # Waiting for `out` gives back-pressure: a slow sink slows the reader, not memory.
                asyncio.run_coroutine_threadsafe(deliver(chunk), loop).result()
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(finish, exc)
        else:
            loop.call_soon_threadsafe(finish, None)

    threading.Thread(target=read, name=f"{name}-output", daemon=True).start()
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        await asyncio.wait({done}, timeout=DRAIN)
        if not done.done():
            await asyncio.to_thread(close)
            await asyncio.wait({done})
        done.exception()  # a read that failed on the closed stream is expected
        raise


def _send_release(stdin: Any) -> None:
    """Write RELEASE to a held shell and close its standard input (a half-close: the engine
    then closes the container's stdin). Raises DriverError when the engine is gone."""
    sock = getattr(stdin, "_sock", stdin)  # docker-py wraps the socket of a plain connection
    try:
        sock.sendall(RELEASE)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        raise DriverError(f"the job's container could not be told to start: {exc}") from exc


_runtimes_seen: weakref.WeakKeyDictionary[docker.DockerClient, tuple[float, set[str]]] = (
    weakref.WeakKeyDictionary()
)


def _runtimes(client: docker.DockerClient) -> set[str]:
    """The engine's OCI runtimes (`docker info`), asked at most every RUNTIMES_TTL seconds
    per client: the answer costs ~13 ms and changes only when the engine's configuration is
    reloaded. Empty when the engine cannot say."""
    now = time.monotonic()
    seen = _runtimes_seen.get(client)
    if seen is None or now - seen[0] > RUNTIMES_TTL:
        try:
            runtimes = set(client.info().get("Runtimes") or {})
        except DockerException as exc:
            log.warning("listing the engine's runtimes failed: %s", exc)
            runtimes = set()
        seen = _runtimes_seen[client] = (now, runtimes)
    return seen[1]


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an engine call's error as seen: when its caller was cancelled, it is nobody's to
    report (destroy() removes what the call made)."""
    if not future.cancelled():
        future.exception()


def _pull(client: docker.DockerClient, name: str) -> tuple[Any, str]:
    """Pull `name`; returns the image and the engine's last status line ("Status: Downloaded
    newer image for ..."). Raises DriverError with the engine's reason."""
    status = ""
    try:
        for event in client.api.pull(name, stream=True, decode=True):
            if event.get("error"):  # failures after the pull began come in the stream
                raise DriverError(f"image {name} could not be pulled: {event['error']}")
            status = event.get("status", status)
        image = client.images.get(name)
    except (DockerException, RequestException) as exc:
        reason = _reason(exc) if isinstance(exc, DockerException) else str(exc)
        raise DriverError(f"image {name} could not be pulled: {reason}") from exc
    return image, status


def _close_stream(stream: Any) -> None:
    """Close an attach stream and its HTTP response: CancellableStream.close() shuts the
    socket but leaves the response holding it (ResourceWarning, docker/docker-py#3282)."""
    if not isinstance(stream, CancellableStream):  # attach_socket's
        _close_socket(stream)
        return
    stream.close()
    response = getattr(stream, "_response", None)
    if response is not None:
        response.close()


def _close_socket(stream: Any) -> None:
    """Close attach_socket's socket: the response first (it reads through `stream`), then
    the socket itself, which the pool no longer holds once the connection was upgraded."""
    raw = getattr(stream, "_sock", None)  # a SocketIO's socket (plain connections)
    response = getattr(stream, "_response", None)
    if response is not None:
        response.close()
    stream.close()
    if raw is not None:
        raw.close()


class _ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (the streamed tar of get_archive)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            self._buffer = next(self._chunks, b"")
            if not self._buffer:
                return 0
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


def _artifact(source: str, tar: tarfile.TarFile, max_size: int) -> IO[bytes]:
    """The content of the first member, checked on its header before any of it is read;
    otherwise the DriverError of docs/manifest.md §6.7."""
    member = tar.next()
    if member is None:
        raise DriverError(f"{source}: no such file")
    if member.isdir():
        raise DriverError(f"{source}: is a directory")
    content = tar.extractfile(member) if member.isfile() else None
    if content is None:
        raise DriverError(f"{source}: not a regular file")
    if max_size and member.size > max_size:
        raise DriverError(f"{source} exceeds the maximum artifact size of {max_size} bytes")
    return content


def _cache_archive(
    helper: Any, where: Callable[[str], str], paths: list[str], destination: Path, max_size: int
) -> list[str]:
    """Write the tar of the workspace `paths` (as `helper` sees them at `where(path)`) to
    `destination`, members renamed from the engine's `<basename>/…` to `<path>/…`; the paths
    that do not exist."""
    missing = []
    try:
        with (
            destination.open("wb") as file,
            tarfile.open(
                fileobj=Capped(file, max_size), mode="w|", format=tarfile.PAX_FORMAT
            ) as out,
        ):
            for path in paths:
                try:
                    chunks, _ = helper.get_archive(where(path))
                except NotFound:
                    missing.append(path)
                    continue
                parent = posixpath.dirname(path)
                reader = io.BufferedReader(_ChunkReader(iter(chunks)))
                with tarfile.open(fileobj=reader, mode="r|") as tar:
                    for member in tar:
                        member.name = posixpath.join(parent, member.name)
                        if member.islnk():  # hard links name a member of the same tar
                            member.linkname = posixpath.join(parent, member.linkname)
                        out.addfile(member, tar.extractfile(member) if member.isfile() else None)
    except DockerException as exc:
        raise DriverError(f"cannot archive the cache: {_reason(exc)}") from exc
    except (tarfile.TarError, OSError) as exc:
        raise DriverError(f"cannot archive the cache: {exc}") from exc
    return missing


def _tar(files: list[_File]) -> bytes:
    """A tar of `files`, to extract at `/`. No directory members: the engine creates missing
    parents (0755) and existing directories keep their owner and mode."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for file in files:
            info = tarfile.TarInfo(file.path.lstrip("/"))
            info.size, info.mode, info.mtime = len(file.data), file.mode, int(time.time())
            tar.addfile(info, io.BytesIO(file.data))
    return buffer.getvalue()


def _strip_tags(source: Path, target: Path, name: str) -> None:
    """Copy the `docker save` archive `source` to `target` keeping one image and no tags.

    Loading tags would let an upload re-point a name other builds resolve in the engine (h.2
    step 2), so the loaded image is known only by ID and the cache tag.
    """
    with tarfile.open(source, mode="r:") as old, tarfile.open(target, mode="w") as new:
        for member in old:
            if member.name in ("manifest.json", "./manifest.json"):
                data = _untagged_manifest(old, member, name)
                member.size = len(data)
                new.addfile(member, io.BytesIO(data))
            elif member.name not in ("repositories", "./repositories"):
                new.addfile(member, old.extractfile(member) if member.isfile() else None)


def _untagged_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> bytes:
    """manifest.json with only the image tagged `name` (or the only image), without tags."""
    content = tar.extractfile(member)
    entries = json.loads(content.read()) if content else None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError("manifest.json is not a list of images")
    wanted = {name, f"{name}:latest"}
    if len(entries) > 1:
        entries = [entry for entry in entries if wanted & set(entry.get("RepoTags") or [])]
    if len(entries) != 1:
        raise ValueError(f"the archive does not hold exactly one image tagged {name}")
    return json.dumps([{**entries[0], "RepoTags": None}]).encode()


def _repository(name: str) -> str:
    """The repository of the image reference `name` as the engine normalises it, without
    Docker Hub's domain and `library/`: `docker.io/library/busybox:1@sha256:…` -> `busybox`."""
    name = name.partition("@")[0]
    head, slash, last = name.rpartition("/")
    name = head + slash + last.partition(":")[0]
    domain, slash, rest = name.partition("/")
    if slash and domain in ("docker.io", "index.docker.io"):
        name = rest.removeprefix("library/")
    return name


def _public(image: Any) -> bool:
    """Whether the engine knows `image` by a name outside the upload cache: a tag or a registry
    digest it got independently. An image known only by cache tags, or only by its ID, may be
    another build's upload."""
    names = [*(image.attrs.get("RepoTags") or []), *(image.attrs.get("RepoDigests") or [])]
    return any(not n.startswith("<none>") and _repository(n) != CACHE_REPOSITORY for n in names)


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _seconds(timestamp: str) -> int:
    """Whole seconds since the epoch of an engine timestamp (`2024-05-01T12:00:00.123456789Z`)."""
    return int(datetime.fromisoformat(timestamp).timestamp())


def _absolute(path: str) -> str:
    # normpath keeps a leading `//` (POSIX allows it a meaning); the engine does not need it.
    return "/" + posixpath.normpath("/" + path).lstrip("/")


def _engine(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, with an engine error raised as DriverError (its reason)."""
    try:
        return call(*args, **kwargs)
    except DockerException as exc:
        raise DriverError(_reason(exc)) from exc


def _reason(exc: DockerException) -> str:
    """The engine's own message for an API error, else the exception text."""
    if isinstance(exc, APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc)


def _remove_labelled(client: docker.DockerClient, labels: list[str], volumes: bool = True) -> None:
    """Force-remove the containers, then the volumes (unless not `volumes`) and networks,
    carrying all `labels`. Logs failures."""
    filters = {"label": labels}
    _remove_each(lambda: client.containers.list(all=True, filters=filters), labels)
    if volumes:
        _remove_each(lambda: client.volumes.list(filters=filters), labels)
    _remove_each(lambda: client.networks.list(filters=filters), labels)


def _remove_each(listing: Callable[[], list[Any]], labels: list[str]) -> None:
    # Never raises (any exception, e.g. a lost connection): cleanup runs whatever happened.
    try:
        items = listing()
    except Exception:
        log.exception("listing leftovers labelled %s failed", labels)
        return
    for item in items:
        try:
            if isinstance(item, Network):  # no force: its containers are gone by now
                item.remove()
            else:
                item.remove(force=True)
        except NotFound:
            pass
        except Exception:
            log.exception("removing %s failed", item.name)
