"""Screenshots of the main pages (issue 13), taken in headless Chromium from a live server with
a few real builds. CI checks that every page renders to an image; to refresh the ones the
README shows:

    MARID_SCREENSHOTS=docs/screenshots .venv/bin/pytest tests/web/test_screenshots.py
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import aiohttp

from marid.runner.worker import Worker
from tests.conftest import bearer
from tests.web.conftest import (
    Live,
    MakePerson,
    Page,
    finished,
    sign_in,
    submit_build,
    wait_build,
)

PNG = b"\x89PNG\r\n\x1a\n"
WIDE, NARROW = (1280, 860), (390, 844)
PASSING = """\
driver: {type: os}
stages: [lint, test]
jobs:
- stage: lint
  commands:
  - "printf '\\\\033[1;34m==>\\\\033[0m checking style\\\\n'"
  - "printf '\\\\033[32m✔ 42 files clean\\\\033[0m\\\\n'"
- stage: test
  commands:
  - "printf '\\\\033[1;34m==>\\\\033[0m running tests\\\\n'"
  - "for i in 1 2 3 4 5 6; do printf 'test_%s ... \\\\033[32mok\\\\033[0m\\\\n' $i; done"
  - "printf '\\\\033[1;32m6 passed\\\\033[0m in 0.4s\\\\n'"
"""
FAILING = """\
driver: {type: os}
stages: [test]
jobs:
- stage: test
  commands:
  - "printf 'test_login ... \\\\033[31mFAILED\\\\033[0m\\\\n'"
  - exit 1
"""


def running(gate: Path) -> str:
    return (
        "driver: {type: os}\nstages: [build, deploy]\njobs:\n- stage: build\n  commands:\n"
        "  - echo compiling\n"
        f"  - while [ ! -e {gate} ]; do sleep 0.1; done\n"
        "- stage: deploy\n  commands:\n  - echo deploying\n"
    )


async def shoot(browser: Page, directory: Path, name: str, size: tuple[int, int]) -> Path:
    await browser.run(browser.driver.set_window_size, *size)
    path = directory / f"{name}.png"
    data = await browser.run(browser.driver.get_screenshot_as_png)
    path.write_bytes(data)
    return path


async def test_screenshots_of_the_main_pages(
    browser: Page, live: Live, worker: Worker, person: MakePerson, tmp_path: Path
) -> None:
    directory = Path(os.environ.get("MARID_SCREENSHOTS") or tmp_path / "screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    ada = await person("ada")
    async with aiohttp.ClientSession() as session:
        await session.post(
            f"{live.api_url}/variables",
            headers=bearer(ada.token),
            json={"key": "DEPLOY_TOKEN", "value": "s3cret-value", "mask": True},
        )
    passed = await submit_build(live, ada, PASSING)
    failed = await submit_build(live, ada, FAILING)
    for build in (passed, failed):
        await wait_build(live, ada, build, finished)
    gate = tmp_path / f"gate-{secrets.token_hex(4)}"
    live_build = await submit_build(live, ada, running(gate))
    shots = []
    try:
        await sign_in(browser, ada.username, ada.password)
        await browser.get(f"/b/ada/{live_build['number']}/jobs/build.1")
        await browser.wait_text("#log", "compiling")
        await browser.get("/builds")
        await browser.wait_for("#builds")
        shots.append(await shoot(browser, directory, "builds", WIDE))
        shots.append(await shoot(browser, directory, "builds-phone", NARROW))
        await browser.get(f"/b/ada/{passed['number']}")
        shots.append(await shoot(browser, directory, "build", WIDE))
        await browser.get(f"/b/ada/{passed['number']}/jobs/test.1")
        await browser.wait_text("#log", "6 passed")
        shots.append(await shoot(browser, directory, "job-log", WIDE))
        await browser.run(
            browser.driver.execute_cdp_cmd,
            "Emulation.setEmulatedMedia",
            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
        )
        await browser.get(f"/b/ada/{live_build['number']}")
        shots.append(await shoot(browser, directory, "build-running-dark", WIDE))
        await browser.get("/builds/new")
        shots.append(await shoot(browser, directory, "new-build-dark", WIDE))
        await browser.run(
            browser.driver.execute_cdp_cmd,
            "Emulation.setEmulatedMedia",
            {"features": [{"name": "prefers-color-scheme", "value": "light"}]},
        )
        await browser.get("/variables")
        shots.append(await shoot(browser, directory, "variables", WIDE))
    finally:
        gate.touch()
    for shot in shots:
        data = shot.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, shot
