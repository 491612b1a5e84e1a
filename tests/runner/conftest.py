"""A Docker engine for the runner tests: started (scripts/docker-up) with the busybox test image
built (scripts/test-images) once per session. Without an engine the docker tests skip, unless
MARID_REQUIRE_DOCKER=1 (CI), where a missing engine fails them."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import docker
import pytest
from docker.errors import DockerException

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
