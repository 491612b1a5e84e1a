"""`marid up` end to end: embedded PostgreSQL, admin token, clean Ctrl-C, data kept."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from marid.pgcluster import free_port


def start_up(data_dir: Path, port: int, cwd: Path) -> tuple[subprocess.Popen[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "MARID_CONFIG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "marid", "up", "--data-dir", str(data_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=cwd,
        env=env,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if "stop:" in line:
            return proc, lines
    proc.kill()
    stop(proc)
    raise AssertionError(f"marid up did not come up: {lines}")


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    finally:
        if proc.stdout:
            proc.stdout.close()


async def get_user(url: str, token: str) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/user", headers=headers) as resp,
    ):
        return resp.status, await resp.json()


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory PostgreSQL's service user can reach when tests run as root (pytest's
    tmp_path lives under a private 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="marid-up-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_marid_up_runs_everything_and_keeps_data(reachable_dir: Path):
    tmp_path = reachable_dir
    data_dir, port = tmp_path / "data", free_port()
    proc, lines = start_up(data_dir, port, tmp_path)
    try:
        url = next(line.split()[-1] for line in lines if line.strip().startswith("API:"))
        token = next(line.split()[-1] for line in lines if line.strip().startswith("token:"))
        assert url == f"http://127.0.0.1:{port}/api"
        status, body = await get_user(url, token)
        assert status == 200 and body["username"] == "admin"
        docker = any("builds run in containers" in line for line in lines)
        assert await build_status(url, token, docker) == "passed"
    finally:
        assert stop(proc) == 0
    assert not (data_dir / "postgres" / "data" / "postmaster.pid").exists()
    assert (data_dir / "crypto.key").stat().st_mode & 0o777 == 0o600

    proc, lines = start_up(data_dir, port, tmp_path)
    try:
        assert not any(line.strip().startswith("token:") for line in lines)
        status, body = await get_user(url, token)
        assert status == 200 and body["username"] == "admin"
    finally:
        assert stop(proc) == 0


async def build_status(url: str, token: str, docker: bool) -> str:
    """Submit a one-job build to `marid up` and wait for its runner to finish it."""
    driver = (
        "{type: docker, image: 'marid-test/busybox:latest', workspace: /w}"
        if docker
        else "{type: os}"
    )
    manifest = f"driver: {driver}\nstages: [s]\njobs:\n- stage: s\n  commands: [echo hi]\n"
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(f"{url}/builds", json={"manifest": manifest}) as resp:
            assert resp.status == 201, await resp.text()
            build_url = (await resp.json())["url"]
        for _ in range(300):
            async with session.get(build_url) as resp:
                status = (await resp.json())["status"]
            if status not in ("queued", "running"):
                return str(status)
            await asyncio.sleep(0.1)
    raise AssertionError("the build never finished")


def test_unreachable_data_dir_is_a_clear_error(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("only root hands the cluster to another user")
    result = subprocess.run(
        [sys.executable, "-m", "marid", "up", "--data-dir", str(tmp_path / "d"), "--port", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 3
    assert "cannot reach" in result.stderr and "Traceback" not in result.stderr
