"""The web tests' harness: a real marid server on a loopback port, in the test's event loop, and
a headless Chromium (Debian's, installed by scripts/browser-up) driven through Selenium.

Selenium blocks, and the server answers from the test's own event loop, so every browser call
runs in a thread (`Page`'s methods do it): a driver call made on the loop itself would wait for
a page the loop can no longer serve. Every wait is bounded (WAIT), so no test can hang.

The browser reaches nothing but loopback: every non-loopback request goes to a proxy address
nobody listens on, no host name resolves, and Chromium's own background traffic (updates,
metrics, safe browsing) is switched off. Selenium never looks for a browser to download
(SE_OFFLINE, and the driver is named).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp
import asyncpg
import pytest

# Before Selenium is imported or used: Selenium Manager must never fetch a browser or driver.
os.environ["SE_OFFLINE"] = "true"

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.wait import WebDriverWait

from marid import users
from marid.api import server
from marid.config import Config
from marid.runner.worker import Worker
from tests.conftest import MakeToken, MakeUser, bearer
from tests.runner.conftest import background_worker

ROOT = Path(__file__).resolve().parents[2]
SETUP = ["scripts/browser-up"]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 30.0  # seconds: the longest any element, page or build is waited for
WINDOW = "1280,1024"
# Scopes of the token a person submits builds with.
BUILD_SCOPE = "build:read,write,delete"
# Chromium's switches: headless, as root in a container, and nothing but loopback reachable.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",  # the tests run as root, where Chromium's sandbox cannot start
    "--disable-dev-shm-usage",  # a container's small /dev/shm would crash the renderer
    f"--window-size={WINDOW}",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-features=OptimizationHints,MediaRouter,Translate,SafeBrowsing,AutofillServerCommunication",
    "--metrics-recording-only",
    # Loopback bypasses any proxy (Chromium's implicit rule); anything else is sent to a port
    # nobody listens on, and no host name resolves (IP literals stay as they are).
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
]

T = TypeVar("T")


# --- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium and chromedriver installed (scripts/browser-up); their versions. Fails, never
    skips: CI must run the browser tests."""
    try:
        done = subprocess.run(SETUP, cwd=ROOT, check=True, capture_output=True, timeout=900)
    except subprocess.CalledProcessError as exc:
        lines = exc.stderr.decode(errors="replace").strip().splitlines()
        pytest.fail(
            f"{' '.join(SETUP)} failed (exit {exc.returncode}), so the browser tests cannot "
            f"run: {' | '.join(lines[-5:]) or 'no message'}",
            pytrace=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{' '.join(SETUP)} could not run: {exc}", pytrace=False)
    return done.stdout.decode().strip()


class Page:
    """The browser, seen from an async test: every method runs the driver in a thread.

    `path` arguments are relative to the server root (`/builds`); absolute URLs are left as
    they are. CSS selectors name elements; `find*` return at once (NoSuchElementException when
    there is none), `wait_*` wait up to WAIT seconds (TimeoutException). The elements they
    return block too: read them in a thread (`run`), or use `text`, `attribute`, `script`.
    """

    def __init__(self, driver: WebDriver, root: str) -> None:
        self.driver = driver
        self.root = root
        self._documents: list[tuple[str, int]] = []  # (url, status) of every document loaded

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` in a thread: for any other blocking Selenium call."""
        return await asyncio.to_thread(call, *args)

    def url(self, path: str) -> str:
        return urljoin(self.root + "/", path)

    # Navigation

    async def get(self, path: str) -> None:
        """Load the page (returns when it has loaded, after any redirects)."""
        await self.run(self.driver.get, self.url(path))

    async def path(self) -> str:
        """The path (and query) of the page shown now."""
        url = await self.run(lambda: self.driver.current_url)
        parts = urlsplit(url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    async def wait_path(self, path: str) -> None:
        """Wait until the page shown is at `path`."""

        def at(driver: WebDriver) -> bool:
            return urlsplit(driver.current_url).path == path

        await self.run(self._wait(f"the page at {path}").until, at)

    async def status(self) -> int:
        """The HTTP status of the document shown now (its last response, after redirects)."""
        documents = await self.documents()
        if not documents:
            raise AssertionError("the browser has loaded no document yet")
        return documents[-1][1]

    async def documents(self) -> list[tuple[str, int]]:
        """(URL, HTTP status) of every document the browser loaded over HTTP so far, redirects
        included, oldest first: from Chromium's network events (the performance log)."""
        entries = await self.run(self.driver.get_log, "performance")
        for entry in entries:
            message = json.loads(entry["message"])["message"]
            params = message.get("params", {})
            if params.get("type") != "Document":
                continue
            if message["method"] == "Network.requestWillBeSent" and "redirectResponse" in params:
                response = params["redirectResponse"]
            elif message["method"] == "Network.responseReceived":
                response = params["response"]
            else:
                continue
            # Only what the tests load over HTTP (not Chromium's own chrome:// new tab page).
            if response["url"].startswith(("http://", "https://")):
                self._documents.append((response["url"], response["status"]))
        return list(self._documents)

    # Elements

    async def find(self, css: str) -> WebElement:
        return await self.run(self.driver.find_element, By.CSS_SELECTOR, css)

    async def find_all(self, css: str) -> list[WebElement]:
        return await self.run(self.driver.find_elements, By.CSS_SELECTOR, css)

    async def exists(self, css: str) -> bool:
        return bool(await self.find_all(css))

    async def wait_for(self, css: str) -> WebElement:
        """The element, once the page shows it."""
        condition = ec.visibility_of_element_located((By.CSS_SELECTOR, css))
        return await self.run(self._wait(f"an element {css!r}").until, condition)

    async def wait_present(self, css: str) -> WebElement:
        """The element, once it is in the page (shown or hidden, e.g. a hidden input)."""
        condition = ec.presence_of_element_located((By.CSS_SELECTOR, css))
        return await self.run(self._wait(f"an element {css!r}").until, condition)

    async def wait_text(self, css: str, text: str) -> WebElement:
        """The element, once its text contains `text`."""
        condition = ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text)
        await self.run(self._wait(f"{text!r} in {css!r}").until, condition)
        return await self.find(css)

    async def text(self, css: str) -> str:
        """The visible text of the element (find: it must be there)."""
        return await self.run(lambda: self.driver.find_element(By.CSS_SELECTOR, css).text)

    async def texts(self, css: str) -> list[str]:
        """The visible text of every matching element, in document order."""
        return await self.run(
            lambda: [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, css)]
        )

    async def attribute(self, css: str, name: str) -> str | None:
        """An attribute (or DOM property, e.g. a link's absolute `href`) of the element."""
        return await self.run(
            lambda: self.driver.find_element(By.CSS_SELECTOR, css).get_attribute(name)
        )

    async def fill(self, css: str, text: str) -> None:
        """Type `text` into the field, replacing what it held."""

        def fill() -> None:
            field = self.driver.find_element(By.CSS_SELECTOR, css)
            field.clear()
            field.send_keys(text)

        await self.run(fill)

    async def click(self, css: str) -> None:
        """Click the element; returns at once (see `submit` for a click that loads a page)."""
        await self.run(lambda: self.driver.find_element(By.CSS_SELECTOR, css).click())

    async def submit(self, css: str) -> None:
        """Click the element (a form's button, a link) and wait until the page it leads to has
        loaded: the old document gone, the new one complete."""

        def submit() -> None:
            # A mark on the old page's window: a new document has a window without it. (Not
            # Selenium's staleness_of: chromedriver can answer an element of a document being
            # replaced with a plain error instead of a stale element one.)
            self.driver.execute_script("window.maridOldPage = true")
            self.driver.find_element(By.CSS_SELECTOR, css).click()
            WebDriverWait(
                self.driver,
                WAIT,
                # While the page is replaced, a script may find no document to run in.
                ignored_exceptions=[WebDriverException],
            ).until(
                lambda d: d.execute_script(
                    "return window.maridOldPage === undefined && document.readyState === 'complete'"
                ),
                f"waited {WAIT:.0f} s for a new page after clicking {css!r}",
            )

        await self.run(submit)

    async def script(self, source: str, *args: Any) -> Any:
        """Run JavaScript in the page (`arguments[i]` are `args`); its return value."""
        return await self.run(self.driver.execute_script, source, *args)

    def _wait(self, what: str) -> WebDriverWait[WebDriver]:
        return _Wait(self.driver, what)


class _Wait(WebDriverWait[WebDriver]):
    """WAIT seconds; a stale element (the page changed under the condition) means: not yet."""

    def __init__(self, driver: WebDriver, what: str) -> None:
        super().__init__(driver, WAIT, ignored_exceptions=[StaleElementReferenceException])
        self.what = what

    def until(self, method: Any, message: str = "") -> Any:
        return super().until(method, message or f"waited {WAIT:.0f} s for {self.what}")


def chromium_options(profile: Path) -> webdriver.ChromeOptions:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in [*CHROMIUM_ARGS, f"--user-data-dir={profile}"]:
        options.add_argument(argument)
    # Chromium's network events, read by Page.documents() for HTTP statuses.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return options


def start_chromium(profile: Path) -> WebDriver:
    driver = webdriver.Chrome(
        service=ChromeService(executable_path=CHROMEDRIVER), options=chromium_options(profile)
    )
    try:
        driver.set_page_load_timeout(WAIT)
        driver.set_script_timeout(WAIT)
    except BaseException:
        driver.quit()
        raise
    return driver


@pytest.fixture
async def browser(chromium: str, live: Live, tmp_path: Path) -> AsyncIterator[Page]:
    """A fresh headless Chromium (its own profile: no cookies) on the live server; quit after
    the test."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    driver = await asyncio.to_thread(start_chromium, profile)
    try:
        yield Page(driver, live.url)
    finally:
        await asyncio.to_thread(driver.quit)


# --- the server -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Live:
    """A marid server answering on a loopback port."""

    url: str  # the server root: the web pages
    api_url: str  # url + "/api"
    config: Config  # what it runs with (server.url and server.api_url are the above)


@pytest.fixture
def web_config(config: Config) -> Config:
    """The test configuration, with the os driver on (builds run as local processes, no
    Docker engine needed) for every user."""
    return dataclasses.replace(config, drivers=["os"])


@pytest.fixture
async def live(web_config: Config) -> AsyncIterator[Live]:
    """The whole marid application (pages and API) served on a free loopback port from the
    test's event loop, as `marid up` serves it."""
    sockets = server.bind("127.0.0.1", 0)
    root = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    settings = dataclasses.replace(web_config.server, url=root, api_url=f"{root}/api")
    config = dataclasses.replace(web_config, server=settings)
    runner = await server.start(config, sockets)
    try:
        yield Live(root, f"{root}/api", config)
    finally:
        await runner.cleanup()


@pytest.fixture
async def worker(live: Live, pool: asyncpg.Pool) -> AsyncIterator[Worker]:
    """A real runner working the live server's queue for the test's duration."""
    async with background_worker(live.config, pool, stop_timeout=WAIT) as running:
        yield running


# --- people and builds ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Person:
    """A user who can sign in (username, password) and submit builds through the API (token)."""

    user: users.User
    password: str
    token: str

    @property
    def username(self) -> str:
        return self.user.username


MakePerson = Callable[[str], Awaitable[Person]]


@pytest.fixture
def person(make_user: MakeUser, token: MakeToken) -> MakePerson:
    """`await person("carol")`: a new user with a password of their own and a token with
    BUILD_SCOPE. (The suite's `token` fixture also creates alice; use other names.)"""

    async def make(username: str) -> Person:
        password = f"{username}-Pa55word"
        user = await make_user(username, password)
        return Person(user, password, await token(BUILD_SCOPE, user=user))

    return make


async def submit_build(live: Live, who: Person, manifest: str) -> dict[str, Any]:
    """Submit a build through the live server's API (POST /api/builds); its JSON."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{live.api_url}/builds", headers=bearer(who.token), json={"manifest": manifest}
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
        return dict(await resp.json())


async def wait_build(
    live: Live, who: Person, build: dict[str, Any], done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The build's JSON (GET through the API) once `done(it)`; fails after WAIT seconds."""
    body: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    async with session.get(build["url"], headers=bearer(who.token)) as resp:
                        assert resp.status == 200, await resp.text()
                        body = dict(await resp.json())
                    if done(body):
                        return body
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"waited {WAIT:.0f} s for build {build['url']}: {body}") from None


def finished(build: dict[str, Any]) -> bool:
    return build["status"] not in ("queued", "running")


async def sign_in(page: Page, username: str, password: str) -> None:
    """Fill in and send the sign-in form (GET /signin); returns on the page it leads to."""
    await page.get("/signin")
    await page.wait_for("form#signin")
    await page.fill("form#signin input[name=username]", username)
    await page.fill("form#signin input[name=password]", password)
    await page.submit("form#signin button[type=submit]")
