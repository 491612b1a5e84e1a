"""Issue 13's acceptance, end to end: the README's run command (`marid up`), then a person in
a browser signs in with the credentials it printed, submits a build from the page and follows
its job's log live while it runs, on a real Docker engine."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from shutil import rmtree

import docker
import pytest

from marid.pgcluster import free_port
from tests.runner.conftest import docker_engine  # noqa: F401 (a fixture)
from tests.web.conftest import Page, sign_in, start_chromium

pytestmark = pytest.mark.docker
START_WAIT = 180.0  # seconds `marid up` may take to print its banner (a first PostgreSQL)
TICKS = 40  # lines the job prints, half a second apart: it runs while the page follows it
MANIFEST = (
    "driver: {type: docker, image: marid-test/busybox:latest, workspace: /w}\n"
    "stages: [test]\njobs:\n- stage: test\n  commands:\n"
    f"  - for i in $(seq 1 {TICKS}); do echo tick $i; sleep 0.5; done\n"
)


class Up:
    """`marid up` in a scratch data directory, its output in a log file."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.log = directory / "up.log"
        marid = Path(sys.executable).parent / "marid"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [str(marid), "up", "--port", str(self.port), "--data-dir", str(directory / "d")],
                cwd=directory,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def password(self) -> str:
        """The admin password of the banner, once `marid up` has printed it."""
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            found = re.search(r"admin: +username admin, password (\S+)", self.log.read_text())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise AssertionError(f"marid up exited: {self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no banner within {START_WAIT:.0f}s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 2)  # Ctrl-C: marid up stops PostgreSQL itself
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


@pytest.fixture
def up(docker_engine: docker.DockerClient) -> Iterator[Up]:  # noqa: F811
    # Not under pytest's private tmp_path: as root, marid up runs PostgreSQL as another user.
    directory = Path(tempfile.mkdtemp(prefix="marid-web-up-", dir="/tmp"))
    directory.chmod(0o755)
    running = Up(directory)
    try:
        yield running
    finally:
        running.stop()
        rmtree(directory, ignore_errors=True)


async def test_a_person_signs_in_with_the_printed_credentials_and_follows_a_build_live(
    up: Up, chromium: str, tmp_path: Path
) -> None:
    password = await asyncio.to_thread(up.password)
    profile = tmp_path / "profile"
    profile.mkdir()
    driver = await asyncio.to_thread(start_chromium, profile)
    browser = Page(driver, up.url)
    try:
        await sign_in(browser, "admin", password)
        await browser.wait_path("/builds")
        await browser.submit("#new-build-link")
        await browser.fill("#manifest", MANIFEST)
        await browser.submit("#new-build button[type=submit]")
        await browser.wait_path("/b/admin/1")
        await browser.get("/b/admin/1/jobs/test.1")
        await browser.wait_text("#log", "tick 1")
        assert await browser.attribute("#log", "data-ended") == "false"  # it is running
        await browser.script("window.followed = true;")
        await browser.wait_text("#log", f"tick {TICKS}")  # arrived live, no reload
        await browser.wait_for("#job-status .status[data-status=passed]")
        assert await browser.script("return window.followed === true;")
    finally:
        await asyncio.to_thread(driver.quit)
