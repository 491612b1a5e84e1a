"""Build caches below the engine (docs/manifest.md §10): each driver's archive() and extract() on
real workspaces, hostile tars, and concurrent saves of one key on both blob store backends."""

from __future__ import annotations

import asyncio
import contextlib
import io
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from marid import caches
from marid.blobs import BlobStore
from marid.caches import BuildCache, Scope
from marid.runner.caches import ServerCaches
from marid.runner.drivers.base import Driver, DriverError, TooLarge
from marid.runner.drivers.os import OsDriver
from marid.runner.drivers.ssh import SshDriver
from marid.users import User
from tests.runner.test_ssh_driver import MakeDriver, Output, make_driver, sh, sshd

__all__ = ["make_driver", "sshd"]  # fixtures of the ssh driver's tests, used here too

WRITE = sh(
    "mkdir -p deps/sub out && echo one > deps/sub/a.txt && ln -s sub/a.txt deps/link"
    " && echo two > out/b && chmod 600 out/b"
)
READ = sh("cat deps/link out/b && ls -l out/b && readlink deps/link")


MakeAny = Callable[[], Awaitable[Driver]]


@pytest.fixture(params=["os", "ssh"])
async def two_drivers(
    request: pytest.FixtureRequest, make_driver: MakeDriver
) -> AsyncIterator[MakeAny]:
    """`await make()` -> a created driver of the parametrised type (two builds' workspaces)."""
    made: list[Driver] = []

    async def make() -> Driver:
        driver: Driver = make_driver() if request.param == "ssh" else OsDriver()
        made.append(driver)
        await driver.create(Output())
        return driver

    yield make
    for driver in made:
        if isinstance(driver, OsDriver):
            await driver.destroy()


async def test_a_tar_of_one_workspace_unpacks_into_the_next(two_drivers: MakeAny, tmp_path: Path):
    first, second = await two_drivers(), await two_drivers()
    assert (await first.run("write", WRITE, {}, Output())).status == 0
    tar = tmp_path / "cache.tar"
    assert await first.archive(["deps", "out", "gone"], tar, 0) == ["gone"]
    with tarfile.open(tar) as opened:
        assert {"deps/sub/a.txt", "deps/link", "out/b"} <= set(opened.getnames())
    await second.extract(tar)
    out = Output()
    assert (await second.run("read", READ, {}, out)).status == 0
    assert out.text.startswith("one\ntwo\n-rw-------")
    assert out.text.endswith("sub/a.txt\n")


async def test_a_tar_past_max_size_is_refused(two_drivers: MakeAny, tmp_path: Path):
    first = await two_drivers()
    await first.run("write", sh("mkdir deps && head -c 100000 /dev/zero > deps/big"), {}, Output())
    with pytest.raises(TooLarge):
        await first.archive(["deps"], tmp_path / "cache.tar", 50000)


def hostile(tmp_path: Path, *members: tuple[str, str]) -> Path:
    """A tar of (name, symlink target or "" for a small file) members."""
    path = tmp_path / "hostile.tar"
    with tarfile.open(path, "w") as tar:
        for name, target in members:
            info = tarfile.TarInfo(name)
            if target:
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            else:
                info.size = 3
                tar.addfile(info, io.BytesIO(b"bad"))
    return path


@pytest.mark.parametrize(
    "members",
    [
        [("../escaped", "")],
        [("link", str(Path("/tmp").resolve())), ("link/escaped", "")],
        [("/escaped", "")],
        [("up", ".."), ("up/escaped", "")],
    ],
)
async def test_no_driver_unpacks_outside_the_workspace(
    two_drivers: MakeAny, tmp_path: Path, members: list[tuple[str, str]]
):
    driver = await two_drivers()
    workspace = Path(str(getattr(driver, "workspace", "")))  # the sshd runs on this host
    before = set(workspace.parent.iterdir())
    with contextlib.suppress(DriverError):  # refused, or unpacked inside
        await driver.extract(hostile(tmp_path, *members))
    assert set(workspace.parent.iterdir()) == before
    assert not Path("/tmp/escaped").exists()
    assert not (tmp_path.parent / "escaped").exists()


async def test_the_os_driver_refuses_a_path_reached_through_a_link_out(tmp_path: Path):
    driver = OsDriver()
    await driver.create(Output())
    try:
        await driver.run("link", sh(f"ln -s {tmp_path} out"), {}, Output())
        with pytest.raises(DriverError, match="outside the workspace"):
            await driver.archive(["out/secret"], tmp_path / "cache.tar", 0)
    finally:
        await driver.destroy()


async def test_the_ssh_driver_names_missing_paths(make_driver: MakeDriver, tmp_path: Path):
    driver: SshDriver = make_driver()
    await driver.create(Output())
    assert await driver.archive(["a", "b c"], tmp_path / "cache.tar", 0) == ["a", "b c"]


async def test_concurrent_saves_of_one_key_leave_one_entry_and_one_blob(
    pool: asyncpg.Pool,
    blob_store: BlobStore,
    stored_blobs: Callable[[], list[str]],
    alice: User,
    tmp_path: Path,
):
    found = BuildCache(Scope(alice.id, None), "deps", ("deps",))
    tars = []
    for number in range(4):
        tar = tmp_path / f"{number}.tar"
        tar.write_bytes(bytes([number]) * (1000 + number))
        tars.append(tar)
    saves = [ServerCaches(pool, blob_store, None, found, 2**30) for _ in tars]
    await asyncio.gather(*(s.save(tar, ["deps"]) for s, tar in zip(saves, tars, strict=True)))
    async with pool.acquire() as conn:
        entries = await caches.page(conn, found.scope, 0, 10)
    assert len(entries) == 1
    assert entries[0].size in {1000, 1001, 1002, 1003}
    assert len(stored_blobs()) == 1
    assert await blob_store.read(entries[0].blob_key) == bytes([entries[0].size - 1000]) * (
        entries[0].size
    )
