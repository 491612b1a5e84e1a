"""A Docker engine for the runner tests: started (scripts/docker-up) with the busybox test image
built (scripts/test-images) once per session. Without an engine the docker tests skip, unless
MARID_REQUIRE_DOCKER=1 (CI), where a missing engine fails them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import os
import subprocess
import tarfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import docker
import pytest
from docker.errors import DockerException, ImageNotFound
from docker.models.containers import Container, ContainerCollection
from docker.models.volumes import Volume, VolumeCollection

from marid.blobs import open_store
from marid.config import Config
from marid.runner.drivers.docker import docker_client
from marid.runner.worker import Worker

ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = "marid-test/busybox:latest"
DEFAULT_HOST = "unix:///var/run/docker.sock"  # config docker.host's default
SETUP = (["scripts/docker-up"], ["scripts/test-images", "--only", "busybox"])
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@contextlib.asynccontextmanager
async def background_worker(
    config: Config, pool: asyncpg.Pool, stop_timeout: float = 60.0
) -> AsyncIterator[Worker]:
    """A runner working in the background while the block runs, then stopped."""
    blobs = open_store(config.storage)
    worker = Worker(config, pool, blobs)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, stop_timeout)
        await blobs.close()


@contextlib.asynccontextmanager
async def background_remote_worker(
    config: Config, pool: asyncpg.Pool, api_url: str, stop_timeout: float = 60.0
) -> AsyncIterator[Worker]:
    """A runner on another machine (runner/remote.py) working in the background while the
    block runs, then stopped: it reaches the API at `api_url` only, registered with an
    enrolment token made now, and its configuration names no database and no crypto key."""
    from marid import remote
    from marid.runner.remote import HttpBackend

    async with pool.acquire() as conn:
        _, enrolment = await remote.create_enrolment(conn, "tests", None, None)
    remote_config = dataclasses.replace(
        config,
        database=dataclasses.replace(config.database, dsn=""),
        crypto=dataclasses.replace(config.crypto, key=""),
    )
    worker = Worker(remote_config, backend=HttpBackend(remote_config, api_url, enrolment))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, stop_timeout)


def settings(**sections: object) -> dict[str, object]:
    """A configuration file's content: the keys every configuration needs, and `sections`."""
    return {
        "server": {"url": "https://ci.example.com"},
        "database": {"dsn": "postgresql://localhost/marid"},
        "crypto": {"key": "k" * 32},
        **sections,
    }


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    """A client for an engine that has marid-test/busybox:latest."""
    try:
        for command in SETUP:
            subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)
        client = docker_client(os.environ.get("DOCKER_HOST", DEFAULT_HOST))
    except subprocess.CalledProcessError as exc:
        _unavailable(f"{' '.join(exc.cmd)} failed: {_own_lines(exc.cmd[0], exc.stderr)}")
    except (OSError, subprocess.TimeoutExpired, DockerException) as exc:
        _unavailable(str(exc))
    yield client
    client.close()


def _own_lines(script: str, stderr: bytes) -> str:
    """The script's own messages (`docker-up: ...`), without the dockerd log tail it appends."""
    lines = stderr.decode(errors="replace").splitlines()
    own = [line for line in lines if line.startswith(f"{Path(script).name}:")]
    return " | ".join(own or lines[-3:])


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("MARID_REQUIRE_DOCKER") == "1":
        pytest.fail(f"MARID_REQUIRE_DOCKER=1 but no Docker engine: {reason}", pytrace=False)
    pytest.skip(f"no Docker engine: {reason}")


class Gate:
    """Holds one engine call of a GatedClient in its worker thread until the test releases
    it, so that a test can act (kill, cancel) at an exact moment of a build:

    - "volume": the workspace volume is being created (create-driver, before any container);
    - "container": the first job container is being created;
    - "created": the first job container exists but has not been started.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.reached = asyncio.Event()  # the call is at the gate
        self._loop = asyncio.get_running_loop()
        self._released = threading.Event()
        self._used = False

    def hold(self, where: str) -> None:
        """In the engine call's thread: wait for release(), the first time `where` matches."""
        if where != self.where or self._used:
            return
        self._used = True
        self._loop.call_soon_threadsafe(self.reached.set)
        self._released.wait(timeout=120)  # a test that fails before release() still ends

    async def wait(self) -> None:
        async with asyncio.timeout(60):
            await self.reached.wait()

    def release(self) -> None:
        self._released.set()


class GatedClient(docker.DockerClient):
    """A client of the real engine (as docker_client() makes) whose calls pass `gate`."""

    def __init__(self, gate: Gate) -> None:
        super().__init__(base_url=os.environ.get("DOCKER_HOST", DEFAULT_HOST))
        self.gate = gate

    @property
    def containers(self) -> ContainerCollection:
        return _GatedContainers(client=self)

    @property
    def volumes(self) -> VolumeCollection:
        return _GatedVolumes(client=self)


class _GatedContainers(ContainerCollection):
    def create(self, image: Any, command: Any = None, **kwargs: Any) -> Container:
        self.client.gate.hold("container")
        container = super().create(image, command, **kwargs)
        self.client.gate.hold("created")
        return container


class _GatedVolumes(VolumeCollection):
    def create(self, name: Any = None, **kwargs: Any) -> Volume:
        self.client.gate.hold("volume")
        return super().create(name, **kwargs)


class LoopbackRegistry:
    """A read-only Docker registry (HTTP API v2) on 127.0.0.1 serving one image, for pulls
    that succeed without leaving the machine. `docker save` gives the config and layers;
    the layers are served gzipped, as registries do."""

    def __init__(self, engine: docker.DockerClient, image: str, repository: str) -> None:
        self.blobs: dict[str, bytes] = {}
        saved = io.BytesIO(b"".join(engine.images.get(image).save(named=False)))
        with tarfile.open(fileobj=saved) as tar:

            def read(path: str) -> bytes:
                member = tar.extractfile(path)
                assert member is not None, path
                return member.read()

            (entry,) = json.loads(read("manifest.json"))
            config = self._blob(read(entry["Config"]))
            layers = [self._blob(gzip.compress(read(path), mtime=0)) for path in entry["Layers"]]
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": CONFIG_TYPE, **config},
                "layers": [{"mediaType": LAYER_TYPE, **layer} for layer in layers],
            }
        ).encode()
        self.repository = repository
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _blob(self, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self.do_GET(body=False)

            def do_GET(self, body: bool = True) -> None:
                prefix = f"/v2/{registry.repository}/"
                content, kind = b"{}", "application/json"
                if self.path.startswith(prefix + "manifests/"):
                    content, kind = registry.manifest, MANIFEST_TYPE
                elif self.path.startswith(prefix + "blobs/"):
                    content = registry.blobs.get(self.path.removeprefix(prefix + "blobs/"), b"")
                    kind = "application/octet-stream"
                elif self.path != "/v2/":
                    content = b""
                if not content:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(content)))
                self.send_header("Docker-Distribution-API-Version", "registry/2.0")
                digest = "sha256:" + hashlib.sha256(content).hexdigest()
                self.send_header("Docker-Content-Digest", digest)
                self.end_headers()
                if body:
                    self.wfile.write(content)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def loopback_registry(docker_engine: docker.DockerClient) -> Iterator[LoopbackRegistry]:
    """A registry on loopback serving busybox as `marid-pulled`; what was pulled from it is
    removed afterwards."""
    registry = LoopbackRegistry(docker_engine, BUSYBOX, "marid-pulled")
    yield registry
    registry.close()
    with contextlib.suppress(ImageNotFound):
        docker_engine.images.remove(f"{registry.address}/marid-pulled:latest")


QEMU_IMAGE_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "qemu-test-image"


@pytest.fixture(scope="session")
def qemu_image() -> Path:
    """The QCOW2 test image of scripts/qemu-test-image, built first if it is not cached (about
    90 s; `.ci/run` builds it before the suite). Never a skip."""
    try:
        done = subprocess.run(
            [str(QEMU_IMAGE_SCRIPT)], capture_output=True, text=True, timeout=1200, check=True
        )
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"scripts/qemu-test-image failed: {exc.stderr[-2000:]}", pytrace=False)
    image = Path(done.stdout.strip().splitlines()[-1])
    assert image.suffix == ".qcow2" and image.is_file(), done.stdout
    return image
