"""`marid up` end to end: embedded PostgreSQL, admin token, clean Ctrl-C, data kept; a taken
port, a second `marid up` on one data directory and credentials that could not be shown."""

import asyncio
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from marid.pgcluster import free_port


def up_command(data_dir: Path, port: int, *extra: str) -> list[str]:
    """`marid up` with `extra` arguments (`--config`, `--allow-os-driver`)."""
    return [
        sys.executable, "-m", "marid", "up", "--data-dir", str(data_dir), "--port", str(port),
        *extra,
    ]  # fmt: skip


def up_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MARID_CONFIG"}


def start_up(
    data_dir: Path, port: int, cwd: Path, *extra: str
) -> tuple[subprocess.Popen[str], list[str]]:
    """`marid up` with `extra` arguments, once its banner is written."""
    proc = subprocess.Popen(
        up_command(data_dir, port, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=cwd,
        env=up_env(),
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


def run_up(data_dir: Path, port: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`marid up` expected to end on its own."""
    return subprocess.run(
        up_command(data_dir, port), capture_output=True, text=True, cwd=cwd, env=up_env(),
        timeout=120,
    )  # fmt: skip


def run_up_unread(data_dir: Path, cwd: Path) -> tuple[int, str]:
    """`marid up` whose stdout is a pipe nobody reads (its read end closed): its exit status
    and stderr."""
    with (cwd / "stderr").open("w+") as stderr:
        proc = subprocess.Popen(
            up_command(data_dir, 0), stdout=subprocess.PIPE, stderr=stderr, cwd=cwd, env=up_env()
        )
        assert proc.stdout is not None
        proc.stdout.close()
        status = proc.wait(timeout=300)
        stderr.seek(0)
        return status, stderr.read()


def banner_value(lines: list[str], label: str) -> str:
    """The last word of the banner line starting with `label`, e.g. `token:`."""
    return next(line.split()[-1] for line in lines if line.strip().startswith(label))


async def token_names(url: str, authorization: str) -> list[str]:
    """The names of the admin's tokens, through GET /api/tokens."""
    headers = {"Authorization": authorization}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/tokens", headers=headers) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return [token["name"] for token in await resp.json()]


async def get_user(url: str, token: str, path: str = "/user") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}{path}", headers=headers) as resp,
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
    # Without an engine the admin's build uses the os driver, which only the flag enables.
    proc, lines = start_up(data_dir, port, tmp_path, "--allow-os-driver")
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
        # admin administers runners (server.admins, docs/api.md §28): its own is listed once
        # it has announced itself.
        for _ in range(100):
            status, body = await get_user(url, token, "/runners")
            if status != 200 or body:
                break
            await asyncio.sleep(0.1)
        assert status == 200 and [runner["remote"] for runner in body] == [False]
    finally:
        assert stop(proc) == 0


OS = "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands: [id]\n"
OS_REFUSED = {"manifest": ["Manifest driver error: os - driver disabled"]}


async def submit_os(url: str, token: str) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.post(f"{url}/builds", json={"manifest": OS}) as resp,
    ):
        return resp.status, await resp.json()


def user_token(data_dir: Path, username: str) -> str:
    """A new user `username` and a build:write token of theirs, made with the CLI on the
    configuration `marid up` wrote."""
    marid = [sys.executable, "-m", "marid", "--config", str(data_dir / "marid.yml")]
    email = ["--email", f"{username}@example.com", "--password", "correct horse battery"]
    for command in (
        ["user", "create", "--username", username, *email],
        ["token", "create", "--user", username, "--scope", "build:read,write"],
    ):
        done = subprocess.run(marid + command, capture_output=True, text=True, env=up_env())
        assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_up_without_docker_enables_os_only_with_the_flag_and_for_the_admin_alone(
    reachable_dir: Path,
):
    """Issue 11 row 1: an engine that is away no longer lets every user run commands here."""
    data_dir = reachable_dir / "data"
    config = reachable_dir / "away.yml"
    config.write_text(f"docker:\n  host: unix://{reachable_dir}/no-engine.sock\n")
    proc, lines = start_up(data_dir, 0, reachable_dir, "--config", str(config))
    try:
        url, admin = banner_value(lines, "API:"), banner_value(lines, "token:")
        assert any("builds need Docker" in line and "--allow-os-driver" in line for line in lines)
        bob = user_token(data_dir, "bob")
        assert await submit_os(url, bob) == (400, OS_REFUSED)
        assert await submit_os(url, admin) == (400, OS_REFUSED)
    finally:
        assert stop(proc) == 0

    flag = ("--config", str(config), "--allow-os-driver")
    proc, lines = start_up(data_dir, 0, reachable_dir, *flag)
    try:
        url = banner_value(lines, "API:")
        assert any("for admin only (--allow-os-driver)" in line for line in lines)
        assert await submit_os(url, bob) == (400, OS_REFUSED)
        status, body = await submit_os(url, admin)
        assert status == 201, body
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


def test_taken_port_is_one_line_and_creates_nothing(tmp_path: Path):
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_up(data_dir, port, tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"marid: cannot listen on 127.0.0.1:{port}: address already in use; "
        "choose another with --port"
    ]
    assert not data_dir.exists()


async def test_second_up_on_a_data_dir_refuses_and_leaves_the_first_alone(reachable_dir: Path):
    data_dir = reachable_dir / "data"
    proc, lines = start_up(data_dir, 0, reachable_dir)
    try:
        url, token = banner_value(lines, "API:"), banner_value(lines, "token:")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        for second_port in (port, 0):  # `scripts/up` twice, and on another port
            result = run_up(data_dir, second_port, reachable_dir)
            assert result.returncode == 2
            assert result.stderr.splitlines() == [
                f"marid: {data_dir} is in use by another marid up (pid {proc.pid}, {url}); "
                "stop it first, or choose another --data-dir"
            ]
            status, body = await get_user(url, token)
            assert status == 200 and body["username"] == "admin"
    finally:
        assert stop(proc) == 0


async def test_up_killed_hard_leaves_nothing_in_the_way(reachable_dir: Path):
    data_dir = reachable_dir / "data"
    proc, lines = start_up(data_dir, 0, reachable_dir)
    url, token = banner_value(lines, "API:"), banner_value(lines, "token:")
    # The start records that it showed the banner just after writing it; wait for that.
    for _ in range(600):
        if await token_names(url, f"Bearer {token}") == ["marid-up"]:
            break
        await asyncio.sleep(0.1)
    proc.kill()  # its lock goes with it; its PostgreSQL keeps running
    proc.wait(timeout=60)
    assert proc.stdout is not None
    proc.stdout.close()
    assert (data_dir / "postgres" / "data" / "postmaster.pid").exists()

    proc, lines = start_up(data_dir, 0, reachable_dir)
    try:
        assert not any(line.strip().startswith("token:") for line in lines)
        status, body = await get_user(banner_value(lines, "API:"), token)
        assert status == 200 and body["username"] == "admin"
    finally:
        assert stop(proc) == 0


async def test_credentials_a_start_could_not_show_are_replaced_at_the_next(reachable_dir: Path):
    data_dir = reachable_dir / "data"
    # Writing the banner fails after `admin` exists: a real fault, no stand-in.
    status, stderr = run_up_unread(data_dir, reachable_dir)
    assert status == 1
    assert "marid: cannot write to standard output" in stderr

    proc, lines = start_up(data_dir, 0, reachable_dir)
    try:
        url, token = banner_value(lines, "API:"), banner_value(lines, "token:")
        password = banner_value(lines, "admin:")
        status, body = await get_user(url, token)
        assert status == 200 and body["username"] == "admin"
        basic = "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()
        # The first start's token is revoked: only the one shown now is left.
        assert await token_names(url, basic) in (["marid-up"], ["marid-up (not shown yet)"])
    finally:
        assert stop(proc) == 0

    proc, lines = start_up(data_dir, 0, reachable_dir)
    try:
        assert not any(line.strip().startswith("token:") for line in lines)  # shown now
    finally:
        assert stop(proc) == 0
