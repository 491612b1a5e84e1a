"""The web interface in a real browser (headless Chromium): signing in and out, the builds a
user sees, and what they must not see. Against a live marid server with a real runner."""

from __future__ import annotations

import json
from typing import Any

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

WRONG = "Wrong username or password"
# Two stages, one job each (test.1, deploy.1) besides create-driver; the deploy job fails.
FAILING = """\
driver: {type: os}
stages: [test, deploy]
jobs:
- stage: test
  commands: [echo testing]
- stage: deploy
  commands: [echo deploying, exit 3]
"""
# The build's own status on its page: the first `.status` outside the jobs table.
BUILD_STATUS = ".status:not(#jobs *)"
PASSING = "driver: {type: os}\nstages: [test]\njobs:\n- stage: test\n  commands: [echo ok]\n"


async def build_rows(page: Page) -> list[dict[str, Any]]:
    """Each `tr.build` of `table#builds`, in order: its link's href and its status."""
    return list(
        await page.script(
            """
            return Array.from(document.querySelectorAll('table#builds tr.build')).map(row => ({
                href: row.querySelector('a.build-link')?.href ?? null,
                status: row.querySelector('.status')?.dataset.status ?? null,
            }));
            """
        )
    )


async def job_rows(page: Page) -> list[dict[str, Any]]:
    """Each `tr.job` of `table#jobs`, in order: its name and its status."""
    return list(
        await page.script(
            """
            return Array.from(document.querySelectorAll('table#jobs tr.job')).map(row => ({
                name: row.querySelector('.job-name')?.textContent.trim() ?? null,
                status: row.querySelector('.status')?.dataset.status ?? null,
            }));
            """
        )
    )


async def assert_signed_out(page: Page) -> None:
    """A page that needs signing in sends the browser to the sign-in form."""
    await page.get("/builds")
    await page.wait_path("/signin")
    await page.wait_for("form#signin")
    assert not await page.exists("#user")


# --- the harness itself (needs no page of marid's) ---------------------------------------------


async def test_harness_browser_reads_the_live_servers_health(browser: Page, live: Live) -> None:
    """The browser reaches the live server in the test's event loop and reads its answer."""
    await browser.get(f"{live.api_url}/health")
    body = json.loads(await browser.text("body"))
    assert body["status"] == "ok" and body["database"] == "ok"
    assert await browser.status() == 200
    assert await browser.path() == "/api/health"
    # A missing resource: the statuses come from the browser's own network events.
    await browser.get(f"{live.api_url}/no-such-thing")
    assert await browser.status() == 404
    assert [status for _, status in await browser.documents()] == [200, 404], (
        await browser.documents()
    )


async def test_harness_submits_and_runs_a_build(
    live: Live, person: MakePerson, worker: Worker
) -> None:
    """A build submitted through the live API is run by the real runner."""
    dora = await person("dora")
    build = await submit_build(live, dora, PASSING)
    done = await wait_build(live, dora, build, finished)
    assert done["status"] == "passed"


# --- the pages ---------------------------------------------------------------------------------


async def test_signing_in_shows_the_users_builds_newest_first(
    browser: Page, live: Live, person: MakePerson, worker: Worker
) -> None:
    carol = await person("carol")
    bob = await person("bob")
    first = await submit_build(live, carol, PASSING)
    second = await submit_build(live, carol, FAILING)
    others = await submit_build(live, bob, PASSING)  # bob's, in no namespace: private to him
    for who, build in ((carol, first), (carol, second), (bob, others)):
        await wait_build(live, who, build, finished)

    await sign_in(browser, carol.username, carol.password)

    await browser.wait_path("/builds")
    assert (f"{live.url}/signin", 303) in await browser.documents()
    assert await browser.text("h1") == "Builds"
    assert await browser.text("nav #user") == "carol"
    rows = await build_rows(browser)
    assert [(row["href"].rpartition("/b/")[2], row["status"]) for row in rows] == [
        (f"carol/{second['number']}", "failed"),
        (f"carol/{first['number']}", "passed"),
    ]
    # Each link leads to the build's own page.
    await browser.submit(f"table#builds a.build-link[href$='/b/carol/{second['number']}']")
    await browser.wait_path(f"/b/carol/{second['number']}")
    assert f"#{second['number']}" in await browser.text("h1")
    assert await browser.attribute(BUILD_STATUS, "data-status") == "failed"


async def test_a_builds_page_lists_its_jobs(
    browser: Page, live: Live, person: MakePerson, worker: Worker
) -> None:
    carol = await person("carol")
    build = await submit_build(live, carol, FAILING)
    await wait_build(live, carol, build, finished)
    await sign_in(browser, carol.username, carol.password)
    await browser.wait_path("/builds")

    await browser.get(f"/b/carol/{build['number']}")

    assert await browser.status() == 200
    assert f"#{build['number']}" in await browser.text("h1")
    assert await browser.attribute(BUILD_STATUS, "data-status") == "failed"
    jobs = {row["name"]: row["status"] for row in await job_rows(browser)}
    assert jobs == {"create-driver": "passed", "test.1": "passed", "deploy.1": "failed"}


async def test_a_wrong_password_shows_an_error_and_stays_signed_out(
    browser: Page, person: MakePerson
) -> None:
    carol = await person("carol")

    await sign_in(browser, carol.username, carol.password + "-not")

    assert await browser.status() == 400
    await browser.wait_text(".error", WRONG)
    assert await browser.exists("form#signin")
    assert not await browser.exists("#user")
    await assert_signed_out(browser)
    # The same form with the right password still works afterwards: the error was the password.
    await sign_in(browser, carol.username, carol.password)
    await browser.wait_path("/builds")


async def test_an_unknown_user_gets_the_same_error(browser: Page) -> None:
    await sign_in(browser, "nobody", "whatever-password")

    assert await browser.status() == 400
    await browser.wait_text(".error", WRONG)
    await assert_signed_out(browser)


async def test_signed_out_a_page_leads_to_the_sign_in_form(browser: Page) -> None:
    await browser.get("/builds")

    await browser.wait_path("/signin")
    assert (await browser.documents())[0][1] in (302, 303, 307)  # /builds itself redirected
    form = "form#signin"
    await browser.wait_for(form)
    assert (await browser.attribute(form, "method") or "").lower() == "post"
    assert urlpath(await browser.attribute(form, "action")) == "/signin"
    for field in ("input[name=username]", "input[name=password]", "button[type=submit]"):
        await browser.wait_for(f"{form} {field}")
    assert await browser.attribute(f"{form} input[name=password]", "type") == "password"
    csrf = f"{form} input[name=csrf]"
    assert await browser.attribute(csrf, "type") == "hidden"
    assert await browser.attribute(csrf, "value")


async def test_another_users_private_build_is_not_found(
    browser: Page, live: Live, person: MakePerson
) -> None:
    carol = await person("carol")
    bob = await person("bob")
    theirs = await submit_build(live, bob, PASSING)  # bob's, in no namespace: private to him
    mine = await submit_build(live, carol, PASSING)
    await sign_in(browser, carol.username, carol.password)
    await browser.wait_path("/builds")
    # Signed in as carol, her own build's page is there (so the 404s below are about access).
    await browser.get(f"/b/carol/{mine['number']}")
    assert await browser.status() == 200

    for path in (f"/b/bob/{theirs['number']}", f"/b/carol/{mine['number'] + 1}"):
        await browser.get(path)
        assert await browser.status() == 404, path
        assert await browser.text("h1") == "Not found", path
        assert await browser.text("nav #user") == "carol", path  # still signed in
    rows = await build_rows(await go(browser, "/builds"))
    assert [row["href"].rpartition("/b/")[2] for row in rows] == [f"carol/{mine['number']}"]


async def test_signing_out_ends_the_session(browser: Page, person: MakePerson) -> None:
    carol = await person("carol")
    await sign_in(browser, carol.username, carol.password)
    await browser.wait_path("/builds")
    assert await browser.text("nav #user") == "carol"
    form = "nav form#signout"
    assert (await browser.attribute(form, "method") or "").lower() == "post"
    assert urlpath(await browser.attribute(form, "action")) == "/signout"
    assert await browser.attribute(f"{form} input[name=csrf]", "value")

    await browser.submit(f"{form} [type=submit]")

    await browser.wait_path("/signin")
    assert not await browser.exists("#user")
    await assert_signed_out(browser)


async def test_a_form_without_its_csrf_token_is_refused(browser: Page, person: MakePerson) -> None:
    carol = await person("carol")
    await sign_in(browser, carol.username, carol.password)
    await browser.wait_path("/builds")

    await browser.script("document.querySelector('form#signout input[name=csrf]').remove()")
    await browser.submit("form#signout [type=submit]")

    assert await browser.status() == 403
    # The sign-out did not happen.
    await browser.get("/builds")
    assert await browser.status() == 200
    assert await browser.text("nav #user") == "carol"


async def test_the_sign_in_form_without_its_csrf_token_is_refused(
    browser: Page, person: MakePerson
) -> None:
    carol = await person("carol")
    await browser.get("/signin")
    await browser.wait_for("form#signin")
    await browser.fill("form#signin input[name=username]", carol.username)
    await browser.fill("form#signin input[name=password]", carol.password)
    await browser.script("document.querySelector('form#signin input[name=csrf]').remove()")

    await browser.submit("form#signin button[type=submit]")

    assert await browser.status() == 403
    await assert_signed_out(browser)


async def go(page: Page, path: str) -> Page:
    await page.get(path)
    return page


def urlpath(url: str | None) -> str:
    """The path of an absolute URL (a form's `action` property is one)."""
    assert url, "no URL"
    return "/" + url.split("://", 1)[-1].partition("/")[2].partition("?")[0]
