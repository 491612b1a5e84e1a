"""A job's log on the web (issue 13): the page renders its end with ANSI colours and numbered
lines, `/live` streams what follows as the API's stream does, `/raw` is the whole text; jobs run
by a real runner (the os driver). tests/web/test_browser.py watches it in a browser."""

from __future__ import annotations

import asyncio
import dataclasses
import html
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import users
from marid.api.app import create_app
from marid.config import Config
from marid.runner.worker import Worker
from tests.conftest import MakeToken, MakeUser
from tests.runner.conftest import background_worker
from tests.runner.test_worker import finished, submit, wait_for
from tests.web.test_pages import Browser

WAIT = 120.0  # seconds any wait below may take before the test fails
COLOURS = """\
driver: {type: os}
stages: [s]
jobs:
- stage: s
  commands:
  - "printf '\\\\033[31mred\\\\033[0m plain <b>&\\\\n'"
  - "printf 'one\\\\rtwo\\\\rthree\\\\n'"
  - "printf 'no newline at the end'"
"""
SLOW = """\
driver: {type: os}
stages: [s]
jobs:
- stage: s
  commands:
  - echo first line
  - sleep 3
  - echo second line
"""


@pytest.fixture
def os_config(config: Config) -> Config:
    """Jobs as local processes of the runner (the os driver): no engine needed."""
    return dataclasses.replace(
        config, drivers=["os"], runner=dataclasses.replace(config.runner, lease=5.0)
    )


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], os_config: Config, pool: asyncpg.Pool
) -> TestClient:
    return await aiohttp_client(create_app(os_config, pool))


@pytest.fixture
async def worker(os_config: Config, pool: asyncpg.Pool) -> AsyncIterator[Worker]:
    async with background_worker(os_config, pool) as running:
        yield running


def log_lines(page: str) -> list[str]:
    """The log's lines as the page shows them (markup kept, numbers dropped)."""
    log = page[page.index('<pre id="log"') : page.index("</pre>")]
    return re.findall(r'<span class="lt">(.*?)</span></span>', log)


async def test_an_ended_jobs_log_is_rendered_with_colours_and_numbered_lines(
    client: TestClient, token: MakeToken, worker: Worker, alice: users.User
) -> None:
    value = await token("build:read,write")
    build = await wait_for(client, value, (await submit(client, value, COLOURS))["url"], finished)
    assert build["status"] == "passed", build["output"]
    browser = Browser(client)
    await browser.sign_in()
    resp, page = await browser.get(f"/b/alice/{build['number']}/jobs/s.1")
    assert resp.status == 200
    lines = log_lines(page)
    red = lines.index('<span class="fg1">red</span> plain &lt;b&gt;&amp;')
    assert lines[red + 2] == "three"  # a carriage return starts the line over
    assert lines[-1] == "no newline at the end"  # ended: the unfinished line is shown
    assert f'id="L{len(lines)}"' in page and f'href="#L{len(lines)}"' in page
    assert 'data-ended="true"' in page
    resp, raw = await browser.get(f"/b/alice/{build['number']}/jobs/s.1/raw")
    assert resp.status == 200 and resp.content_type == "text/plain"
    assert "\x1b[31mred\x1b[0m plain <b>&\n" in raw and raw.endswith("no newline at the end")


async def test_a_running_jobs_page_streams_what_follows(
    client: TestClient, token: MakeToken, worker: Worker, alice: users.User
) -> None:
    value = await token("build:read,write")
    build = await submit(client, value, SLOW)
    browser = Browser(client)
    await browser.sign_in()
    path = f"/b/alice/{build['number']}/jobs/s.1"
    async with asyncio.timeout(WAIT):
        while True:  # until the page shows the first line, the job still running
            _, page = await browser.get(path)
            if "first line" in page:
                break
            await asyncio.sleep(0.1)
    assert 'data-ended="false"' in page, page
    assert "second line" not in page
    offset = re.search(r'data-offset="(\d+)"', page)
    assert offset and re.search(r'data-live="([^"]+)"', page).group(1) == path + "/live"
    headers = {**browser._headers(), "Accept": "text/event-stream"}
    events = []
    async with (
        asyncio.timeout(WAIT),
        client.get(f"{path}/live?offset={offset.group(1)}", headers=headers) as resp,
    ):
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        event = ""
        async for raw_line in resp.content:
            line = raw_line.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((event, json.loads(line.removeprefix("data: "))))
                if event == "status":
                    break
    text = "".join(data["text"] for kind, data in events if kind == "output")
    assert "second line\n" in text and "first line" not in text  # only what followed
    assert events[-1] == (
        "status",
        {"status": "passed", "finished_at": events[-1][1]["finished_at"]},
    )


async def test_another_users_job_is_not_found_in_every_form(
    client: TestClient, token: MakeToken, make_user: MakeUser, alice: users.User
) -> None:
    bob = await make_user("bob")
    theirs = await submit(client, await token("build:write", user=bob), SLOW)
    browser = Browser(client)
    await browser.sign_in()
    for suffix in ("", "/raw", "/live"):
        resp, page = await browser.get(f"/b/bob/{theirs['number']}/jobs/s.1{suffix}")
        assert resp.status == 404 and "<h1>Not found</h1>" in page, suffix
    resp, page = await browser.get(f"/b/alice/{theirs['number']}/jobs/nope")
    assert resp.status == 404 and html.unescape("Not found") in page


PARTS = """\
driver: {type: os}
env:
- PLAIN=visible
objects:
- notes.txt => notes.txt
stages: [s]
jobs:
- stage: s
  commands:
  - mkdir -p dist && printf '<html><script>alert(1)</script>' > dist/page.html
  artifacts:
  - dist/page.html => out/page.html
"""


async def test_a_builds_page_lists_its_artifacts_objects_and_variables(
    client: TestClient, token: MakeToken, worker: Worker, alice: users.User, make_user: MakeUser
) -> None:
    value = await token("build:read,write variable:write object:write")
    await client.post(
        "/api/variables",
        headers={"Authorization": f"Bearer {value}"},
        json={"key": "SECRET", "value": "hunter2-web", "mask": True},
    )
    await client.post(
        "/api/objects?name=notes.txt", headers={"Authorization": f"Bearer {value}"}, data=b"n\n"
    )
    build = await wait_for(client, value, (await submit(client, value, PARTS))["url"], finished)
    assert build["status"] == "passed", build["output"]
    browser = Browser(client)
    await browser.sign_in()
    resp, page = await browser.get(f"/b/alice/{build['number']}")
    assert resp.status == 200
    link = f'href="/b/alice/{build["number"]}/artifacts/out/page.html" download>out/page.html<'
    assert link in page
    assert "<code>notes.txt</code>" in page
    assert "<code>SECRET</code>" in page and "hunter2" not in page and "xxxxxx" in page
    assert "<code>PLAIN</code>" in page and "<code>visible</code>" in page
    resp, body = await browser.get(f"/b/alice/{build['number']}/artifacts/out/page.html")
    assert resp.status == 200 and body == "<html><script>alert(1)</script>"
    assert resp.headers["Content-Disposition"] == "attachment; filename*=UTF-8''page.html"
    assert resp.headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    other = Browser(client)
    await make_user("bob")
    await other.sign_in("bob")
    resp, page = await other.get(f"/b/alice/{build['number']}/artifacts/out/page.html")
    assert resp.status == 404 and "<h1>Not found</h1>" in page


async def test_a_long_log_page_holds_only_its_end_and_links_to_the_rest(
    client: TestClient, token: MakeToken, worker: Worker, alice: users.User
) -> None:
    value = await token("build:read,write")
    manifest = "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands:\n  - seq 1 200000\n"
    build = await wait_for(client, value, (await submit(client, value, manifest))["url"], finished)
    assert build["status"] == "passed"
    browser = Browser(client)
    await browser.sign_in()
    resp, page = await browser.get(f"/b/alice/{build['number']}/jobs/s.1")
    assert resp.status == 200
    lines = log_lines(page)
    assert lines[-1] == "200000" and len(page) < 2 * 1024 * 1024  # 1.3 MB of output
    assert lines[0].isdigit() and int(lines[0]) > 1  # starts at a whole line, not the top
    skipped = re.search(r'<p class="muted" id="skipped">The first (\d+) bytes', page)
    assert skipped and int(skipped.group(1)) > 1_000_000
    resp, raw = await browser.get(f"/b/alice/{build['number']}/jobs/s.1/raw")
    assert raw.startswith("+ seq 1 200000\n1\n2\n") and raw.endswith("\n200000\n")
