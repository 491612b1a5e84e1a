"""The os driver collects absolute artifact paths where they are, as Djinn's does
(docs/manifest.md §6.7, §9.3; issue 12 part 4: Djinn's Test_WorkerCollectArtifacts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from marid.runner.drivers.base import DriverError
from marid.runner.drivers.os import OsDriver
from marid.runner.execute import JobSpec, StageSpec
from tests.runner.test_execute import run, spec


async def discard(chunk: bytes) -> None:
    pass


async def test_absolute_sources_are_read_at_their_real_path(tmp_path: Path):
    outside = tmp_path / "report.txt"
    outside.write_text("from outside the workspace\n")
    driver = OsDriver()
    await driver.create(discard)
    try:
        await driver.collect("/etc/hosts", tmp_path / "hosts", 0)
        assert (tmp_path / "hosts").read_bytes() == Path("/etc/hosts").read_bytes()
        await driver.collect(str(outside), tmp_path / "report", 0)
        assert (tmp_path / "report").read_text() == "from outside the workspace\n"
    finally:
        await driver.destroy()


async def test_relative_sources_stay_in_the_workspace(tmp_path: Path):
    driver = OsDriver()
    await driver.create(discard)
    try:
        await driver.run("j", "echo built > out.txt\n", {}, discard)
        await driver.collect("out.txt", tmp_path / "out", 0)
        assert (tmp_path / "out").read_text() == "built\n"
        with pytest.raises(DriverError, match=r"^\.\./x: outside the workspace$"):
            await driver.collect("../x", tmp_path / "x", 0)
        with pytest.raises(DriverError, match=r"^/nonexistent/file: no such file$"):
            await driver.collect("/nonexistent/file", tmp_path / "n", 0)
        with pytest.raises(DriverError, match=r"^/etc: is a directory$"):
            await driver.collect("/etc", tmp_path / "d", 0)
        with pytest.raises(DriverError, match=r"^/dev/zero: not a regular file$"):
            await driver.collect("/dev/zero", tmp_path / "z", 0)
    finally:
        await driver.destroy()


async def test_a_build_collects_absolute_paths_as_djinns_test_does(tmp_path: Path):
    """Djinn's Test_WorkerCollectArtifacts: `cat /etc/os-release`, then /etc/hosts,
    /etc/os-release and /etc/shells collected under their base names."""
    sources = ["/etc/hosts", "/etc/os-release", "/etc/shells"]
    build = spec(
        StageSpec(
            "collect",
            False,
            [
                JobSpec(
                    "collect.1",
                    "cat /etc/os-release",
                    artifacts=[(source, Path(source).name) for source in sources],
                )
            ],
        ),
        artifact_max_size=0,
    )
    status, rec, _ = await run(build)
    assert status == "passed", rec.output
    assert rec.artifacts == {Path(s).name: Path(s).read_bytes() for s in sources}
    assert "artifact error" not in rec.output["collect.1"]
