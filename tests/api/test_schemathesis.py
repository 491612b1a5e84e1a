"""The API fuzzed from its own OpenAPI document (issue 11): schemathesis, as a subprocess,
against `marid serve`'s server (api/server.start) on a loopback port, once anonymously and once
with a token holding every scope. No request may be answered with a 5xx.

CI runs a bounded pass (MAX_EXAMPLES cases per operation and phase, fixed seed, only the
server-error check) within about a minute. The full run of the acceptance, every check and
schemathesis' default of 100 examples, is the same test with `MARID_FUZZ=full`:

    MARID_FUZZ=full .venv/bin/pytest tests/api/test_schemathesis.py -s

It prints what schemathesis found for each run; it still fails only on a 5xx. Set
MARID_FUZZ_REPORTS to a new directory to keep the runs' NDJSON reports.

Nothing leaves the machine: the server's image downloads (the only requests the API process
makes itself) are switched off, no runner or scheduler runs (so no build, cron or webhook
delivery), and the OAuth operations, which the document serves from the server root, point at
the same loopback server.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from marid import scopes
from marid.api import downloads, server
from marid.config import Config
from tests.conftest import MakeToken

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
FULL = os.environ.get("MARID_FUZZ") == "full"
MAX_EXAMPLES = 100 if FULL else 4
SEED = os.environ.get("MARID_FUZZ_SEED", "" if FULL else "1111")
BOUND = 3600.0 if FULL else 300.0  # seconds for one schemathesis run, as a last resort
# Where the NDJSON reports go (default: the test's temporary directory).
REPORTS = os.environ.get("MARID_FUZZ_REPORTS")
EVERY_SCOPE = " ".join(f"{resource}:read,write,delete" for resource in scopes.RESOURCES)
# Operations that would end the run's own credentials: revoking the bearer token, deleting a
# token (the run's own among them).
SELF_REVOKING = r"^/(logout/oauth/revoke|tokens/\{id\})$"
# A fuzzer's malformed Content-Disposition headers make aiohttp warn (a RuntimeWarning it
# prints once in production); the suite turns warnings into errors, which would be 500s here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::aiohttp.BadContentDispositionHeader"),
    pytest.mark.filterwarnings("ignore::aiohttp.BadContentDispositionParam"),
]


@pytest.fixture
async def live(config: Config, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """The server root URL of a live API with every image download switched off."""
    monkeypatch.setattr(downloads.Downloads, "start", lambda self, image_id: None)
    sockets = server.bind("127.0.0.1", 0)
    root = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    # alice, whose token the second run sends, administers runners (docs/api.md §28).
    settings = dataclasses.replace(config.server, url=root, api_url=f"{root}/api", admins=["alice"])
    runner = await server.start(dataclasses.replace(config, server=settings), sockets)
    try:
        yield root
    finally:
        await runner.cleanup()


@dataclasses.dataclass
class Run:
    """What one schemathesis run did, from its NDJSON report."""

    exit_code: int
    output: str
    operations: set[str] = dataclasses.field(default_factory=set)
    requests: int = 0
    server_errors: list[str] = dataclasses.field(default_factory=list)
    failed_checks: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def describe(self, name: str) -> str:
        checks = ", ".join(f"{check} {n}" for check, n in sorted(self.failed_checks.items()))
        return (
            f"{name}: exit {self.exit_code}, {len(self.operations)} operations, "
            f"{self.requests} requests, {len(self.server_errors)} 5xx; "
            f"failed checks: {checks or 'none'}"
        )


async def fuzz(root: str, report: Path, *options: str) -> Run:
    checks = "all" if FULL else "not_a_server_error"
    command = [
        SCHEMATHESIS,
        "run",
        f"{root}/api/openapi.json",
        f"--checks={checks}",
        "--phases=examples,coverage,fuzzing",
        f"--max-examples={MAX_EXAMPLES}",
        "--continue-on-failure",
        "--suppress-health-check=all",
        "--request-timeout=30",
        # One worker: with two threads, CPython 3.11.7's ast module (which schemathesis's
        # coverage phase uses) sometimes fails with "SystemError: AST constructor recursion
        # depth mismatch" (a race fixed in later CPython releases), a broken run that says
        # nothing about marid.
        "--workers=1",
        "--generation-database=none",  # each run on its own: no examples kept from the last
        "--report=ndjson",
        f"--report-dir={report}",
        *([f"--seed={SEED}"] if SEED else []),
        *options,
    ]
    env = {**os.environ, "NO_COLOR": "1"}
    report.mkdir(parents=True)
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=report,  # schemathesis keeps a cache of failures in ./.schemathesis
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), BOUND)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    run = Run(process.returncode, output.decode(errors="replace"))
    for path in report.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            read(run, json.loads(line))
    return run


def read(run: Run, event: dict[str, Any]) -> None:
    finished = event.get("ScenarioFinished")
    if finished is None:
        return
    recorder = finished["recorder"]
    for interaction in recorder.get("interactions", {}).values():
        run.operations.add(recorder["label"])
        run.requests += 1
        request, response = interaction["request"], interaction.get("response")
        if response is not None and response["status_code"] >= 500:
            run.server_errors.append(
                f"{request['method']} {request['uri']} -> {response['status_code']}"
            )
    for results in recorder.get("checks", {}).values():
        for check in results:
            if check["status"] == "failure":
                run.failed_checks[check["name"]] += 1


def verdict(name: str, run: Run, caplog: pytest.LogCaptureFixture) -> None:
    print(run.describe(name))
    if FULL:
        print(run.output[run.output.find("SUMMARY") :])
    crashes = [r.getMessage() for r in caplog.records if r.name == "marid.api.errors"]
    assert run.server_errors == [] and crashes == [], (run.server_errors[:20], crashes[:20])
    assert run.requests > 0, run.output[-3000:]
    if not FULL:  # only the server-error check ran: anything else is a broken run
        assert run.exit_code == 0, run.output[-5000:]


async def test_the_fuzzer_finds_no_server_error(
    live: str, token: MakeToken, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.ERROR, logger="marid.api.errors")
    reports = Path(REPORTS) if REPORTS else tmp_path
    anonymous = await fuzz(live, reports / "anonymous")
    verdict("anonymous", anonymous, caplog)
    value = await token(EVERY_SCOPE)
    with_token = await fuzz(
        live,
        reports / "token",
        f"--header=Authorization: Bearer {value}",
        f"--exclude-path-regex={SELF_REVOKING}",
    )
    verdict("with a token holding every scope", with_token, caplog)
