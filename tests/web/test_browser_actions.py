"""Submitting and killing a build in a real browser (issue 13): the form shows a manifest's
errors beside it, a good one becomes a build whose job's log is followed live, and Kill ends
it. The job runs on a real runner (os driver) until killed."""

from __future__ import annotations

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys

from marid.runner.worker import Worker
from tests.web.conftest import Live, MakePerson, Page, finished, sign_in, wait_build

RUNS_UNTIL_KILLED = (
    "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands:\n"
    "  - echo started from the browser\n  - sleep 600\n"
)


async def test_a_build_submitted_from_the_page_is_followed_and_killed(
    browser: Page, live: Live, worker: Worker, person: MakePerson
) -> None:
    dave = await person("dave")
    await sign_in(browser, dave.username, dave.password)
    await browser.submit("#new-build-link")
    await browser.wait_path("/builds/new")
    await browser.fill("#manifest", "driver: {type: docker}\nstages: [s]\n")
    await browser.submit("#new-build button[type=submit]")
    errors = await browser.wait_for("#manifest-errors")
    assert "Manifest driver docker requires image" in await browser.run(lambda: errors.text)
    assert await browser.attribute("#manifest", "aria-invalid") == "true"
    await browser.fill("#manifest", RUNS_UNTIL_KILLED)
    await browser.fill("#comment", "from a browser")
    await browser.submit("#new-build button[type=submit]")
    await browser.wait_path("/b/dave/1")
    await browser.get("/b/dave/1/jobs/s.1")
    await browser.wait_text("#log", "started from the browser")
    await browser.get("/b/dave/1")
    assert await browser.text("h1") == "Build #1"
    await browser.submit("#kill button")
    await browser.wait_for(".heading .status[data-status=killed]")
    assert not await browser.exists("#kill")
    build = await wait_build(live, dave, {"url": f"{live.api_url}/b/dave/1"}, finished)
    assert build["status"] == "killed" and build["trigger"]["comment"] == "from a browser"


async def test_a_masked_variable_is_created_from_the_page_and_never_shown(
    browser: Page, live: Live, person: MakePerson
) -> None:
    erin = await person("erin")
    await sign_in(browser, erin.username, erin.password)
    await browser.submit("nav a[href='/variables']")
    await browser.wait_path("/variables")
    await browser.fill("#key", "DEPLOY_TOKEN")
    await browser.fill("#value", "s3cret-value-123")
    await browser.click("#mask")
    await browser.submit("#new-variable button[type=submit]")
    await browser.wait_path("/variables")
    row = await browser.wait_for("#variables tr.variable")
    assert "DEPLOY_TOKEN" in await browser.run(lambda: row.text)
    assert await browser.text("#variables .value") == "xxxxxx"
    source = await browser.run(lambda: browser.driver.page_source)
    assert "s3cret-value-123" not in source


async def test_signing_in_and_moving_around_works_with_the_keyboard_alone(
    browser: Page, live: Live, person: MakePerson
) -> None:
    fay = await person("fay")
    await browser.get("/signin")
    await browser.wait_for("form#signin")

    def type_keys(*keys: str) -> None:
        ActionChains(browser.driver).send_keys(*keys).perform()

    def focused() -> str:
        element = browser.driver.switch_to.active_element
        return element.get_attribute("id") or element.text

    assert await browser.run(focused) == "username"  # the field has the focus at once
    await browser.run(type_keys, fay.username, Keys.TAB, fay.password, Keys.ENTER)
    await browser.wait_path("/builds")
    await browser.run(type_keys, Keys.TAB)  # the first stop: past the navigation
    assert await browser.run(focused) == "Skip to content"
    await browser.run(type_keys, Keys.ENTER)
    outline = await browser.script(
        "const a = [...document.querySelectorAll('nav a')][0]; a.focus();"
        "return getComputedStyle(a).outlineStyle;"
    )
    assert outline not in ("", "none")  # a visible focus ring
