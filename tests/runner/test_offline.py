"""`marid run` (docs/manifest.md §9.4): a manifest executed locally, no server; real processes and
the real Docker engine."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import docker
import pytest

MANIFEST = """\
driver:
  type: os
env:
- GREETING=hello there
objects:
- input.txt => in/input.txt
stages: [build, check]
jobs:
- stage: build
  commands:
  - echo "$GREETING"
  - tr a-z A-Z < in/input.txt > out.txt
  artifacts:
  - out.txt => dist/out.txt
- stage: check
  commands: [exit 4]
"""


def marid_run(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "marid", "run", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_runs_the_manifest_and_writes_artifacts(tmp_path: Path):
    (tmp_path / ".marid.yml").write_text(MANIFEST)
    (tmp_path / "input.txt").write_text("shout\n")
    result = marid_run(tmp_path, "--artifacts", "artifacts")
    assert result.returncode == 1  # the check stage fails
    assert "hello there\n" in result.stdout
    assert (tmp_path / "artifacts" / "dist" / "out.txt").read_text() == "SHOUT\n"
    assert "<== check.1: failed" in result.stderr and "build failed" in result.stderr


def test_stage_option_runs_setup_and_that_stage_only(tmp_path: Path):
    (tmp_path / ".djinn.yml").write_text(MANIFEST)  # the fallback name
    (tmp_path / "input.txt").write_text("x\n")
    result = marid_run(tmp_path, "--stage", "build")
    assert result.returncode == 0, result.stderr
    assert "check.1" not in result.stderr
    missing = marid_run(tmp_path, "--stage", "nope")
    assert (missing.returncode, missing.stderr) == (
        2,
        "marid run: no stage named 'nope' in the manifest\n",
    )


def test_a_cache_is_checked_and_otherwise_ignored(tmp_path: Path):
    (tmp_path / ".marid.yml").write_text(MANIFEST + "cache: [../up]\n")
    result = marid_run(tmp_path)
    assert (result.returncode, result.stderr) == (
        2,
        "marid run: cache: paths[0] must not contain ..\n",
    )
    (tmp_path / ".marid.yml").write_text(MANIFEST + "cache: [in]\n")
    (tmp_path / "input.txt").write_text("x\n")
    result = marid_run(tmp_path, "--stage", "build")
    assert result.returncode == 0, result.stderr
    assert "cache" not in result.stdout + result.stderr


def test_invalid_manifest_and_usage_exit_2(tmp_path: Path):
    result = marid_run(tmp_path)
    assert result.returncode == 2
    assert "no manifest" in result.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("driver: {type: docker}\n")
    result = marid_run(tmp_path, "--manifest", str(bad))
    assert result.returncode == 2
    assert result.stderr == (
        "marid run: Manifest driver docker requires image\n"
        "Manifest driver docker requires workspace\n"
    )
    bad.write_text("driver: {type: qemu, image: x}\n")
    assert "cannot run offline" in marid_run(tmp_path, "--manifest", str(bad)).stderr


def run_in(tmp_path: Path, manifest: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / ".marid.yml").write_text(manifest)
    return marid_run(tmp_path, *args)


DOCKER = "driver: {type: docker, image: 'marid-test/busybox:latest', workspace: /work}\n"
OS = "driver: {type: os}\n"
PACKAGE = """\
stages: [package]
jobs:
- stage: package
  commands:
  - mkdir -p out
  - echo built > out/notes.txt
  - head -c 300000 /dev/urandom > /tmp/app.bin
  - sha256sum /tmp/app.bin
  artifacts:
  - out/notes.txt => notes.txt
  - /tmp/app.bin => dist/app.bin
"""


def labelled_offline(engine: docker.DockerClient) -> set[str]:
    """Containers and volumes of offline runs (build id 0) on the engine."""
    label = {"label": "marid.build=0"}
    containers = engine.containers.list(all=True, filters=label)
    return {c.name for c in containers} | {v.name for v in engine.volumes.list(filters=label)}


@pytest.mark.docker
def test_docker_jobs_artifacts_are_written_to_the_artifacts_directory(
    tmp_path: Path, docker_engine: docker.DockerClient
):
    before = labelled_offline(docker_engine)
    result = run_in(tmp_path, DOCKER + PACKAGE, "--artifacts", "collected")

    assert result.returncode == 0, result.stdout + result.stderr
    collected = tmp_path / "collected"
    assert (collected / "notes.txt").read_text() == "built\n"
    content = (collected / "dist" / "app.bin").read_bytes()
    assert len(content) == 300000
    assert f"{hashlib.sha256(content).hexdigest()}  /tmp/app.bin\n" in result.stdout
    assert "artifact error" not in result.stdout
    assert labelled_offline(docker_engine) <= before  # the run removed what it made


MISSING = """\
stages: [package, after]
jobs:
- stage: package
  commands: [echo made > made.txt]
  artifacts:
  - made.txt
  - missing.txt => dist/missing.txt
- stage: after
  commands: [echo never runs]
"""


@pytest.mark.parametrize(
    "driver",
    [pytest.param(DOCKER, marks=pytest.mark.docker, id="docker"), pytest.param(OS, id="os")],
)
def test_an_artifact_that_cannot_be_collected_fails_the_job_and_the_run(
    tmp_path: Path, request: pytest.FixtureRequest, driver: str
):
    if driver == DOCKER:
        request.getfixturevalue("docker_engine")
    result = run_in(tmp_path, driver + MISSING, "--artifacts", "collected")

    assert result.returncode == 1
    assert "Collecting artifact missing.txt => dist/missing.txt\n" in result.stdout
    assert "artifact error: missing.txt: no such file\n" in result.stdout
    assert "<== package.1: failed\n" in result.stderr
    assert "<== after.1: failed (not run)\n" in result.stderr
    assert result.stderr.endswith("build failed\n")
    assert (tmp_path / "collected" / "made.txt").read_text() == "made\n"  # the others still are


def test_an_artifact_named_outside_the_artifacts_directory_fails_the_job(tmp_path: Path):
    manifest = OS + (
        "stages: [s]\njobs:\n- stage: s\n  commands: [echo x > x.txt]\n"
        "  artifacts: [x.txt => ../x.txt]\n"
    )
    result = run_in(tmp_path, manifest, "--artifacts", "collected")

    assert result.returncode == 1
    assert "artifact error: ../x.txt: outside collected\n" in result.stdout
    assert not (tmp_path / "x.txt").exists()


@pytest.mark.docker
def test_pull_never_runs_only_images_the_engine_has(
    tmp_path: Path, docker_engine: docker.DockerClient
):
    # `never`: an image the engine lacks is an error at once (nothing is asked of a registry).
    missing = "driver: {type: docker, image: 'marid-test/absent:none', workspace: /w}\n"
    job = "stages: [s]\njobs:\n- stage: s\n  commands: [true]\n"
    result = run_in(tmp_path, missing + job, "--pull", "never")

    assert result.returncode == 1
    assert "marid-test/absent:none not found" in result.stdout
    assert "(this runner pulls no images: --pull is never)" in result.stdout
    assert "Pulling" not in result.stdout
    assert run_in(tmp_path, DOCKER + job, "--pull", "never").returncode == 0
    assert run_in(tmp_path, DOCKER + job, "--pull", "sometimes").returncode == 2
