"""A job's log followed live in a real browser (issue 13): lines the job prints appear on the
open page, coloured and numbered, and its status turns when it ends, with no reload. The job
runs on a real runner (os driver) and waits on a gate file the test creates."""

from __future__ import annotations

import secrets
from pathlib import Path

from marid.runner.worker import Worker
from tests.web.conftest import (
    Live,
    MakePerson,
    Page,
    finished,
    sign_in,
    submit_build,
    wait_build,
)


async def test_a_running_jobs_log_grows_on_the_open_page(
    browser: Page, live: Live, worker: Worker, person: MakePerson, tmp_path: Path
) -> None:
    carol = await person("carol")
    gate = tmp_path / f"gate-{secrets.token_hex(4)}"
    manifest = (
        "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands:\n"
        "  - \"printf '\\\\033[32mfirst line\\\\033[0m\\\\n'\"\n"
        f"  - while [ ! -e {gate} ]; do sleep 0.1; done\n"
        "  - echo second line\n"
    )
    build = await submit_build(live, carol, manifest)
    await sign_in(browser, carol.username, carol.password)
    await browser.get(f"/b/carol/{build['number']}/jobs/s.1")
    await browser.wait_text("#log", "first line")
    assert await browser.exists("#log .fg2")  # the ANSI green
    assert "second line" not in await browser.text("#log")
    assert await browser.attribute("#job-status .status", "data-status") == "running"
    await browser.script("window.notReloaded = true;")
    gate.touch()
    await browser.wait_text("#log", "second line")
    status = await browser.wait_for("#job-status .status[data-status=passed]")
    assert "passed" in await browser.run(lambda: status.text)
    assert await browser.script("return window.notReloaded === true;")
    numbers = await browser.texts("#log .line .ln")
    assert numbers == [str(n) for n in range(1, len(numbers) + 1)] and len(numbers) >= 4
    assert (await wait_build(live, carol, build, finished))["status"] == "passed"
