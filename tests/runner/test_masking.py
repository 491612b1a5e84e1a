"""Masked values in the forms marid's own `set -x` prints them (issue 11 row 7,
docs/manifest.md §6.12): jobs run by the real shells, through the os and docker drivers."""

from __future__ import annotations

import itertools
import random
import shutil
import subprocess

import docker
import pytest

from marid.manifest import script
from marid.output import MASK, Masker, forms
from marid.runner.drivers.base import Limits
from marid.runner.drivers.docker import DockerDriver
from marid.runner.drivers.os import OsDriver
from marid.runner.execute import BuildSpec, Execution, JobSpec, StageSpec
from tests.runner.conftest import BUSYBOX
from tests.runner.test_execute import Recorder, spec

# ', ", \, spaces, a newline and $, and a line of its own that is long enough to be masked.
SECRET = "pa'ss \"w\\o rd\n$HOME x'y"
LITERAL = "'" + SECRET.replace("'", "'\\''") + "'"  # SECRET as a shell word
COMMANDS = "\n".join(
    [
        'echo "$SECRET"',
        "echo $SECRET",
        'X="a${SECRET}b"',
        "printf '%s\\n' \"$SECRET\" | head -1",
        f"Y={LITERAL}",
        'test "$Y" = "$SECRET"',
    ]
)
# Pieces of SECRET and of its quoted forms that would give it away.
FRAGMENTS = ["pa'", 'ss "w', "w\\o", "x'y", "'\\''", "'\"'\"'", "$HOME x", "HOME'"]
_build_ids = itertools.count(random.randrange(10**6, 10**9, 1000))


def assert_hidden(output: str) -> None:
    for form in forms(SECRET):
        assert form not in output, (form, output)
    for fragment in FRAGMENTS:
        assert fragment not in output, (fragment, output)
    assert MASK in output


def job_build() -> BuildSpec:
    return spec(
        StageSpec("test", False, [JobSpec("leak", COMMANDS)]),
        env={"SECRET": SECRET},
        secrets=[SECRET],
    )


@pytest.mark.parametrize("shell", ["dash", "bash", "busybox"])
def test_the_job_script_traced_by_each_shell_shows_no_form_of_the_value(shell: str) -> None:
    """The script marid builds, run by each shell /bin/sh may be, masked in one go."""
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    command = [shell, "ash"] if shell == "busybox" else [shell]
    done = subprocess.run(
        [*command, "-c", script([COMMANDS])],
        env={"SECRET": SECRET, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        capture_output=True,
        check=True,
        timeout=10,
    )
    output = Masker([SECRET]).mask_all(done.stdout)
    assert output.count("+ ") == 7, output  # every command traced, `head` too
    assert_hidden(output)


async def test_the_os_driver_job_shows_no_form_of_the_value() -> None:
    recorder = Recorder()
    execution = Execution(job_build(), OsDriver(Limits(2**31, 1.0, 4096)), recorder)
    assert await execution.run() == "passed"
    assert_hidden(recorder.output["leak"])


@pytest.mark.docker
async def test_the_docker_driver_job_shows_no_form_of_the_value(
    docker_engine: docker.DockerClient,
) -> None:
    driver = DockerDriver(
        docker_engine,
        build_id=next(_build_ids),
        attempt=1,
        image=BUSYBOX,
        workspace="/work",
        limits=Limits(memory=64 * 1024**2, cpus=1.0, pids=64),
        network="none",
        pull="never",
        uploaded=_nothing_uploaded,
    )
    recorder = Recorder()
    try:
        assert await Execution(job_build(), driver, recorder).run() == "passed"
    finally:
        await driver.destroy()
    output = recorder.output["leak"]
    assert "+ echo 'xxxxxx" in output  # busybox quoted the value: masked in that form
    assert_hidden(output)


async def _nothing_uploaded(name: str) -> None:
    return None
