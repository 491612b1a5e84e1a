"""A Docker engine for the runner tests: started (scripts/docker-up) with the busybox test image
built (scripts/test-images) once per session. Without an engine the docker tests skip, unless
MARID_REQUIRE_DOCKER=1 (CI), where a missing engine fails them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import docker
import pytest
from docker.errors import DockerException
from docker.models.containers import Container, ContainerCollection
from docker.models.volumes import Volume, VolumeCollection

from marid.runner.drivers.docker import docker_client

ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = "marid-test/busybox:latest"
DEFAULT_HOST = "unix:///var/run/docker.sock"  # config docker.host's default
SETUP = (["scripts/docker-up"], ["scripts/test-images", "--only", "busybox"])


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
