"""`marid run` (EXTENSIONS.md h.4): a manifest executed locally, no server, real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
