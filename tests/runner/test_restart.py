"""A restarted build runs for real (issue 14 item 1, docs/api.md §27): the first run fails, its
restart, made from the same stored plan, runs every job again on a real runner and passes."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient

from marid.runner.worker import Worker
from tests.conftest import MakeToken, bearer
from tests.runner.test_worker import SCOPE, client, finished, os_config, submit, wait_for, worker

__all__ = ["client", "os_config", "worker"]  # the fixtures this module shares

# Fails while the flag file is missing, and creates it: the first run fails, a second passes.
MANIFEST = """\
driver:
  type: os
stages: [check]
jobs:
- stage: check
  commands:
  - echo "run $(cat {runs} 2>/dev/null | wc -l)"
  - echo x >> {runs}
  - test -e {flag} || {{ touch {flag}; exit 1; }}
"""


async def test_a_failed_build_restarted_runs_again_and_passes(
    client: TestClient, token: MakeToken, worker: Worker, tmp_path: Path
):
    value = await token(SCOPE)
    runs, flag = tmp_path / "runs", tmp_path / "flag"
    first = await submit(client, value, MANIFEST.format(runs=runs, flag=flag))
    done = await wait_for(client, value, first["url"], finished)
    assert done["status"] == "failed"

    resp = await client.post("/api/b/alice/1/restart", headers=bearer(value))
    assert resp.status == 201, await resp.text()
    again = await wait_for(client, value, (await resp.json())["url"], finished)
    assert again["status"] == "passed"
    assert again["restarted_from"].endswith("/b/alice/1")
    assert "run 1" in again["output"]  # its job ran again, after the first run's
    assert runs.read_text() == "x\nx\n"
