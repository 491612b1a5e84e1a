"""Fault test with a real `marid serve` process (issue 10, docs/configuration.md §1.3
`reaper`): the server sweeps at start, a live upload's spool file is never taken, and the
spool file of a server killed with SIGKILL mid-upload is removed by the next sweep."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import yaml

from marid.blobs import FsStore
from marid.config import Config
from marid.pgcluster import free_port
from marid.reaper import Reaper
from marid.uploads import SPOOL
from tests.conftest import MakeToken, bearer

CHUNK = b"x" * (256 * 1024)
GRACE = 3600.0
OLD = timedelta(seconds=GRACE + 60)


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "spool"
    directory.mkdir()
    return directory


@pytest.fixture
def server(config: Config, tmp_path: Path, spool_dir: Path) -> Iterator[Server]:
    port = free_port()
    settings = {
        "server": {"url": f"http://127.0.0.1:{port}", "listen": f"127.0.0.1:{port}"},
        "database": {"dsn": config.database.dsn, "pool_size": 2},
        "crypto": {"key": config.crypto.key},
        "storage": {"backend": "fs", "path": str(tmp_path / "blobs")},
        "objects": {"max_size": "1g"},
        "rate_limit": {"enabled": False},
        "reaper": {"grace": f"{int(GRACE)}s"},
    }
    path = tmp_path / "marid.yml"
    path.write_text(yaml.safe_dump(settings))
    made = Server(path, port, spool_dir, tmp_path / "serve.log")
    yield made
    made.kill()


class Server:
    """`marid serve` in a child process whose temporary directory is `spool_dir`."""

    def __init__(self, config: Path, port: int, spool_dir: Path, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/api"
        self.log = log
        env = {**os.environ, "TMPDIR": str(spool_dir)}
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "marid", "--config", str(config), "serve"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    async def listening(self) -> None:
        async with asyncio.timeout(60):
            while True:
                assert self.process.poll() is None, self.log.read_text()
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port)),
                ):
                    return
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the server."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


async def wait_for(condition: Callable[[], object]) -> None:
    """Return once `condition()` holds: a file appears or goes in another process."""
    async with asyncio.timeout(60):
        while not condition():  # noqa: ASYNC110 - files of another process, no event to wait on
            await asyncio.sleep(0.05)


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{SPOOL[0]}*{SPOOL[1]}"))


@pytest.fixture
async def uploading(
    server: Server, token: MakeToken, spool_dir: Path
) -> AsyncIterator[asyncio.Task[None]]:
    """A slow upload to the server, started and spooling, never finished by the client."""
    await server.listening()
    headers = bearer(await token("object:write"))
    sent = asyncio.Event()
    forever = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield CHUNK
        sent.set()
        await forever.wait()  # the rest of the content never comes

    async def upload() -> None:
        async with aiohttp.ClientSession() as session:
            await session.post(
                f"{server.url}/objects", params={"name": "big.bin"}, headers=headers, data=body()
            )

    task = asyncio.create_task(upload())
    await sent.wait()
    await wait_for(lambda: [f for f in spool_files(spool_dir) if f.stat().st_size])
    yield task
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
        await task


async def test_the_server_sweeps_at_start(server: Server, spool_dir: Path):
    left = spool_dir / f"{SPOOL[0]}from-a-dead-server{SPOOL[1]}"
    left.write_bytes(b"x" * 1024)
    when = (datetime.now(UTC) - OLD).timestamp()
    os.utime(left, (when, when))
    young = spool_dir / f"{SPOOL[0]}young{SPOOL[1]}"
    young.write_bytes(b"x")
    await server.listening()
    await wait_for(lambda: not left.exists())
    assert young.exists()


async def test_a_server_killed_mid_upload_leaves_a_spool_file_the_next_sweep_removes(
    server: Server,
    uploading: asyncio.Task[None],
    pool: asyncpg.Pool,
    spool_dir: Path,
    tmp_path: Path,
):
    [spooled] = spool_files(spool_dir)
    sweeper = Reaper(pool, FsStore(tmp_path / "blobs"), GRACE, temp_dir=spool_dir)
    later = datetime.now(UTC) + OLD  # the spool file is older than the grace period then

    # The server is alive and still receiving: its spool file is held, whatever its age.
    assert (await sweeper.tick(later)).files == 0
    assert spool_files(spool_dir) == [spooled]

    server.kill()
    assert spool_files(spool_dir) == [spooled]  # nothing in the server removed it
    assert (await sweeper.tick(later)).files == 1
    assert spool_files(spool_dir) == []
    assert await pool.fetchval("SELECT count(*) FROM objects") == 0
