"""The web interface over HTTP (issue 13): sign-in with CSRF, sessions, the builds pages, and
that a page shows nothing the API hides. tests/web/test_browser.py drives the same pages in
a real browser."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from marid import sessions, users
from marid.api.app import create_app
from marid.api.keys import POOL
from marid.api.web import pages as web_pages
from marid.config import Config
from tests.conftest import MakeToken, MakeUser, bearer
from tests.runner.test_worker import submit

MANIFEST = (
    "driver: {type: docker, image: busybox, workspace: /w}\n"
    "stages: [s]\njobs:\n- stage: s\n  commands: [true]\n"
)


def cookies_of(resp: ClientResponse) -> dict[str, SimpleCookie]:
    """The Set-Cookie headers of `resp` by cookie name (the test client would drop Secure
    cookies over plain HTTP, so tests carry them by hand)."""
    found = {}
    for header in resp.headers.getall("Set-Cookie", []):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        for name in jar:
            found[name] = jar
    return found


def hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, html
    return match.group(1)


class Browser:
    """A client that keeps cookies by hand and never follows redirects."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.cookies: dict[str, str] = {}

    def _headers(self) -> dict[str, str]:
        jar = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return {"Cookie": jar} if jar else {}

    def _keep(self, resp: ClientResponse) -> None:
        for name, jar in cookies_of(resp).items():
            if jar[name]["max-age"] == "0" or not jar[name].value:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = jar[name].value

    async def get(self, path: str) -> tuple[ClientResponse, str]:
        resp = await self.client.get(path, headers=self._headers(), allow_redirects=False)
        self._keep(resp)
        return resp, await resp.text()

    async def post(self, path: str, form: dict[str, str]) -> tuple[ClientResponse, str]:
        resp = await self.client.post(
            path, data=form, headers=self._headers(), allow_redirects=False
        )
        self._keep(resp)
        return resp, await resp.text()

    async def sign_in(self, username: str = "alice", password: str = "password1") -> ClientResponse:
        _, html = await self.get("/signin")
        resp, _ = await self.post(
            "/signin",
            {"csrf": hidden(html, "csrf"), "username": username, "password": password},
        )
        return resp


@pytest.fixture
def browser(api: TestClient) -> Browser:
    return Browser(api)


async def test_the_sign_in_page_sets_its_csrf_cookie_and_safe_headers(browser: Browser) -> None:
    resp, html = await browser.get("/signin")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert '<form id="signin" method="post" action="/signin">' in html
    cookie = cookies_of(resp)["marid_signin"]["marid_signin"]
    assert cookie.value == hidden(html, "csrf") and len(cookie.value) >= 40
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["secure"]
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Cache-Control"] == "no-store"


async def test_signing_in_needs_the_forms_csrf_token(browser: Browser, alice: users.User) -> None:
    await browser.get("/signin")
    form = {"username": "alice", "password": "password1"}
    resp, html = await browser.post("/signin", form)
    assert resp.status == 403 and "Form refused" in html
    resp, _ = await browser.post("/signin", {**form, "csrf": "guessed"})
    assert resp.status == 403
    assert "marid_session" not in browser.cookies


async def test_a_wrong_password_is_refused_and_signs_nobody_in(
    browser: Browser, alice: users.User
) -> None:
    resp = await browser.sign_in(password="wrong")
    assert resp.status == 400
    assert 'class="error"' in await resp.text()
    assert "Wrong username or password" in await resp.text()
    assert "marid_session" not in browser.cookies


async def test_signing_in_opens_a_session_and_lands_on_the_builds(
    browser: Browser, alice: users.User, pool: asyncpg.Pool
) -> None:
    resp = await browser.sign_in()
    assert resp.status == 303 and resp.headers["Location"] == "/builds"
    cookie = cookies_of(resp)["marid_session"]["marid_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax" and cookie["secure"]
    assert cookie["path"] == "/"
    async with pool.acquire() as conn:  # stored as a digest only
        row = await conn.fetchrow("SELECT digest, user_id FROM web_sessions")
    assert row["digest"] == sessions.digest(cookie.value) != cookie.value
    assert row["user_id"] == alice.id
    resp, html = await browser.get("/builds")
    assert resp.status == 200
    assert '<span id="user" class="who">alice</span>' in html


async def test_pages_that_need_a_session_send_visitors_to_sign_in(browser: Browser) -> None:
    resp, _ = await browser.get("/builds?status=failed")
    assert resp.status == 303
    assert resp.headers["Location"] == "/signin?next=%2Fbuilds%3Fstatus%3Dfailed"
    resp, _ = await browser.get("/")
    assert resp.headers["Location"] == "/signin"


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil"])
async def test_after_sign_in_only_a_local_path_is_followed(
    browser: Browser, alice: users.User, target: str
) -> None:
    _, html = await browser.get("/signin")
    resp, _ = await browser.post(
        "/signin",
        {"csrf": hidden(html, "csrf"), "username": "alice", "password": "password1",
         "next": target},
    )  # fmt: skip
    assert resp.status == 303 and resp.headers["Location"] == "/builds"


async def test_the_builds_page_lists_what_the_api_lists_and_nothing_else(
    browser: Browser, api: TestClient, token: MakeToken, make_user: MakeUser, alice: users.User
) -> None:
    mine = await submit(api, await token("build:write"), MANIFEST)
    bob = await make_user("bob")
    theirs = await submit(api, await token("build:write", user=bob), MANIFEST)
    await browser.sign_in()
    _, html = await browser.get("/builds")
    assert f'href="/b/alice/{mine["number"]}"' in html
    assert 'href="/b/bob/' not in html
    assert 'data-status="queued"' in html
    # bob's private build is a 404 page, as GET /api/b/bob/1 is a 404 for alice
    resp, html = await browser.get(f"/b/bob/{theirs['number']}")
    assert resp.status == 404 and "<h1>Not found</h1>" in html
    resp, html = await browser.get(f"/b/alice/{mine['number']}")
    assert resp.status == 200
    assert f"Build #{mine['number']}" in html
    assert f'<a href="/b/alice/{mine["number"]}/jobs/create-driver">create-driver</a>' in html


async def test_a_session_cookie_does_not_authorize_the_api(
    browser: Browser, alice: users.User
) -> None:
    await browser.sign_in()
    resp, _ = await browser.get("/api/builds")
    assert resp.status == 404  # as without a token: the API takes tokens and Basic alone


async def test_signing_out_needs_the_csrf_token_and_ends_the_session(
    browser: Browser, alice: users.User, pool: asyncpg.Pool
) -> None:
    await browser.sign_in()
    _, html = await browser.get("/builds")
    resp, _ = await browser.post("/signout", {})
    assert resp.status == 403
    resp, _ = await browser.post("/signout", {"csrf": hidden(html, "csrf")})
    assert resp.status == 303 and resp.headers["Location"] == "/signin"
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM web_sessions") == 0
    resp, _ = await browser.get("/builds")
    assert resp.status == 303


async def test_setting_the_password_again_ends_the_users_sessions(
    browser: Browser, alice: users.User, pool: asyncpg.Pool
) -> None:
    await browser.sign_in()
    async with pool.acquire() as conn:
        await users.set_password(conn, alice, "another-password")
    resp, _ = await browser.get("/builds")
    assert resp.status == 303 and resp.headers["Location"].startswith("/signin")


async def test_an_unknown_page_is_an_html_404_and_the_api_keeps_json(browser: Browser) -> None:
    resp, html = await browser.get("/no/such/page")
    assert resp.status == 404 and resp.content_type == "text/html"
    assert "<h1>Not found</h1>" in html
    resp, _ = await browser.get("/api/no/such/thing")
    assert resp.status == 404 and resp.content_type == "application/json"


async def test_a_form_that_is_not_urlencoded_or_too_large_is_refused(
    browser: Browser, api: TestClient
) -> None:
    resp = await api.post("/signin", json={"username": "alice"}, allow_redirects=False)
    assert resp.status == 415
    resp = await api.post(
        "/signin",
        data="x=" + "a" * 70000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        allow_redirects=False,
    )
    assert resp.status == 413


async def test_the_stylesheet_is_served_with_a_version(browser: Browser) -> None:
    _, html = await browser.get("/signin")
    href = re.search(r'href="(/static/marid\.css\?v=[^"]+)"', html)
    assert href, html
    resp, css = await browser.get(href.group(1))
    assert resp.status == 200 and "prefers-color-scheme: dark" in css


async def test_a_public_build_is_readable_signed_out_and_a_private_one_is_not(
    browser: Browser, api: TestClient, token: MakeToken, alice: users.User
) -> None:
    value = await token("build:write namespace:write")
    await api.post(
        "/api/namespaces", headers=bearer(value), json={"name": "open", "visibility": "public"}
    )
    public = await submit(api, value, "namespace: open\n" + MANIFEST)
    private = await submit(api, value, MANIFEST)
    resp, html = await browser.get(f"/b/alice/{public['number']}")
    assert resp.status == 200 and "alice/open" in html
    resp, html = await browser.get(f"/b/alice/{private['number']}")
    assert resp.status == 404 and "<h1>Not found</h1>" in html


async def test_a_build_is_submitted_from_the_form_and_its_errors_shown_beside_the_fields(
    browser: Browser, alice: users.User, pool: asyncpg.Pool
) -> None:
    await browser.sign_in()
    resp, html = await browser.get("/builds/new")
    assert resp.status == 200 and '<form id="new-build"' in html
    csrf = hidden(html, "csrf")
    resp, _ = await browser.post("/builds/new", {"manifest": MANIFEST})
    assert resp.status == 403
    bad = "driver: {type: docker}\nstages: [s]\ncache: [../up]\n"
    resp, html = await browser.post(
        "/builds/new", {"csrf": csrf, "manifest": bad, "comment": "c", "tags": "a, b"}
    )
    assert resp.status == 400
    errors = re.search(r'<ul class="field-errors" id="manifest-errors">(.*?)</ul>', html)
    assert errors and "Manifest driver docker requires image" in errors.group(1)
    errors = re.search(r'<ul class="field-errors" id="cache-errors">(.*?)</ul>', html)
    assert errors and "paths[0] must not contain .." in errors.group(1)
    assert f"{bad}</textarea>" in html  # kept for fixing
    assert 'value="a, b"' in html
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM builds") == 0
    resp, _ = await browser.post(
        "/builds/new", {"csrf": csrf, "manifest": MANIFEST, "comment": "from the web",
                        "tags": "web, first"},
    )  # fmt: skip
    assert resp.status == 303 and resp.headers["Location"] == "/b/alice/1"
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT status, trigger_comment, user_id FROM builds")
        tags = await conn.fetchval("SELECT array_agg(name ORDER BY name) FROM build_tags")
    assert dict(row) == {"status": "queued", "trigger_comment": "from the web", "user_id": alice.id}
    assert tags == ["first", "web"]


async def test_a_build_is_killed_and_pinned_from_its_page_by_those_who_may(
    browser: Browser, api: TestClient, token: MakeToken, make_user: MakeUser, alice: users.User
) -> None:
    value = await token("build:read,write")
    mine = await submit(api, value, MANIFEST)
    bob = await make_user("bob")
    theirs = await submit(api, await token("build:write", user=bob), MANIFEST)
    await browser.sign_in()
    _, html = await browser.get(f"/b/alice/{mine['number']}")
    assert 'id="kill"' in html and 'id="pin"' in html
    csrf = hidden(html, "csrf")
    resp, _ = await browser.post(f"/b/alice/{mine['number']}/kill", {})
    assert resp.status == 403
    resp, _ = await browser.post(f"/b/alice/{mine['number']}/kill", {"csrf": csrf})
    assert resp.status == 303 and resp.headers["Location"] == f"/b/alice/{mine['number']}"
    resp, _ = await browser.post(f"/b/alice/{mine['number']}/pin", {"csrf": csrf})
    assert resp.status == 303
    build = await (await api.get(f"/api/b/alice/{mine['number']}", headers=bearer(value))).json()
    assert (build["status"], build["pinned"]) == ("killed", True)
    _, html = await browser.get(f"/b/alice/{mine['number']}")
    assert 'id="kill"' not in html and 'id="unpin"' in html and 'id="pinned"' in html
    # bob's build: not found, and untouched
    resp, html = await browser.post(f"/b/bob/{theirs['number']}/kill", {"csrf": csrf})
    assert resp.status == 404 and "<h1>Not found</h1>" in html
    bobs = await (
        await api.get(
            f"/api/b/bob/{theirs['number']}", headers=bearer(await token("build:read", user=bob))
        )
    ).json()
    assert bobs["status"] == "queued"


async def test_a_finished_build_is_restarted_and_resumed_from_its_page(
    browser: Browser, api: TestClient, token: MakeToken, pool: asyncpg.Pool
) -> None:
    value = await token("build:read,write,delete")
    await submit(api, value, MANIFEST)
    await browser.sign_in()
    _, html = await browser.get("/b/alice/1")
    assert 'id="restart"' not in html  # queued: it can be killed, not restarted
    csrf = hidden(html, "csrf")
    await browser.post("/b/alice/1/kill", {"csrf": csrf})
    _, html = await browser.get("/b/alice/1")
    assert 'id="restart"' in html and 'class="resume"' not in html  # no kept workspace
    resp, _ = await browser.post("/b/alice/1/restart", {"csrf": csrf})
    assert resp.status == 303 and resp.headers["Location"] == "/b/alice/2"
    _, html = await browser.get("/b/alice/2")
    assert 'id="restarted-from"' in html and "Restart of #1" in html

    # With the workspace kept, each job after the setup stage offers to resume from it; a
    # resume the API refuses shows why.
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO kept_workspaces (build_id, attempt, driver, place, location, expires_at)"
            " SELECT id, 1, driver, 'os:elsewhere', '/nowhere', now() + interval '1 h'"
            " FROM builds WHERE number = 1"
        )
    _, html = await browser.get("/b/alice/1")
    assert 'aria-label="Resume from create-driver"' not in html
    assert re.findall(r'aria-label="Resume from ([^"]+)"', html) == ["s.1"]
    resp, html = await browser.post("/b/alice/1/restart", {"csrf": csrf, "from": "s.1"})
    assert resp.status == 400  # killed while queued, its create-driver never passed
    assert "from: Job create-driver, before s.1, did not pass" in html
    async with pool.acquire() as conn:
        await conn.execute("UPDATE build_jobs SET status = 'passed' WHERE name = 'create-driver'")
    resp, _ = await browser.post("/b/alice/1/restart", {"csrf": csrf, "from": "s.1"})
    assert resp.status == 303 and resp.headers["Location"] == "/b/alice/3"
    _, html = await browser.get("/b/alice/3")
    assert "Resume of #1 from s.1" in html


async def test_variables_are_listed_created_and_deleted_with_masked_values_hidden(
    browser: Browser, api: TestClient, token: MakeToken, make_user: MakeUser, alice: users.User
) -> None:
    value = await token("variable:read,write")
    bob = await make_user("bob")
    bobs = await token("variable:write", user=bob)
    await api.post("/api/variables", headers=bearer(bobs), json={"key": "BOBS", "value": "b"})
    await browser.sign_in()
    resp, html = await browser.get("/variables")
    assert resp.status == 200 and "No variables" in html
    csrf = hidden(html, "csrf")
    resp, _ = await browser.post("/variables", {"key": "PLAIN", "value": "shown"})
    assert resp.status == 403
    resp, _ = await browser.post("/variables", {"csrf": csrf, "key": "PLAIN", "value": "shown"})
    assert resp.status == 303 and resp.headers["Location"] == "/variables"
    form = {"csrf": csrf, "key": "TOKEN", "value": "hunter2-secret", "mask": "on"}
    resp, _ = await browser.post("/variables", form)
    assert resp.status == 303
    _, html = await browser.get("/variables")
    assert "<code>PLAIN</code>" in html and "<code>shown</code>" in html
    assert "<code>TOKEN</code>" in html and "hunter2" not in html and "xxxxxx" in html
    assert "BOBS" not in html
    # a refused form: errors beside the fields, a masked value not sent back
    resp, html = await browser.post(
        "/variables", {"csrf": csrf, "key": "1bad", "value": "short", "mask": "on"}
    )
    assert resp.status == 400
    assert re.search(r'id="key-errors"><li>Key can only have letters', html)
    assert re.search(r'id="value-errors"><li>Value cannot be shorter than 6', html)
    assert 'value="short"' not in html
    listed = await (await api.get("/api/variables", headers=bearer(value))).json()
    ids = {v["key"]: v["id"] for v in listed}
    assert set(ids) == {"PLAIN", "TOKEN"}
    resp, _ = await browser.post(f"/variables/{ids['PLAIN']}/delete", {"csrf": csrf})
    assert resp.status == 303
    async with api.app[POOL].acquire() as conn:
        remaining = await conn.fetch("SELECT key FROM variables ORDER BY key")
        bobs_id = await conn.fetchval("SELECT id FROM variables WHERE key = 'BOBS'")
    assert [r["key"] for r in remaining] == ["BOBS", "TOKEN"]
    resp, html = await browser.post(f"/variables/{bobs_id}/delete", {"csrf": csrf})
    assert resp.status == 404 and "<h1>Not found</h1>" in html


async def test_uploaded_html_is_never_served_as_a_page_of_the_site(
    api: TestClient, token: MakeToken, alice: users.User
) -> None:
    value = await token("object:read,write")
    page = b"<!doctype html><html><script>fetch('/builds/new')</script></html>"
    resp = await api.post("/api/objects?name=page.html", headers=bearer(value), data=page)
    assert resp.status == 201, await resp.text()
    found = await resp.json()
    assert found["type"].startswith("text/html")  # sniffed as the API always did
    resp = await api.get(
        f"/api/objects/{found['id']}", headers={**bearer(value), "Accept": found["type"]}
    )
    assert resp.status == 200 and await resp.read() == page
    assert resp.headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_the_builds_can_be_narrowed_to_a_namespace_without_telling_hidden_ones_apart(
    browser: Browser, api: TestClient, token: MakeToken, make_user: MakeUser, alice: users.User
) -> None:
    value = await token("build:write namespace:write")
    await api.post("/api/namespaces", headers=bearer(value), json={"name": "team"})
    in_team = await submit(api, value, "namespace: team\n" + MANIFEST)
    outside = await submit(api, value, MANIFEST)
    bob = await make_user("bob")
    bobs = await token("build:write namespace:write", user=bob)
    await api.post("/api/namespaces", headers=bearer(bobs), json={"name": "secret"})
    await submit(api, bobs, "namespace: secret\n" + MANIFEST)
    await browser.sign_in()
    _, html = await browser.get("/builds?namespace=alice/team")
    assert f'href="/b/alice/{in_team["number"]}"' in html
    assert f'href="/b/alice/{outside["number"]}"' not in html
    assert 'href="/builds?namespace=alice/team"' in html
    _, hidden_page = await browser.get("/builds?namespace=bob/secret")
    _, missing_page = await browser.get("/builds?namespace=bob/nothing")
    assert "No builds match these filters" in hidden_page
    assert hidden_page.replace("bob/secret", "X") == missing_page.replace("bob/nothing", "X")


async def test_namespaces_are_listed_and_shown_as_the_api_shows_them(
    browser: Browser, api: TestClient, token: MakeToken, make_user: MakeUser, alice: users.User
) -> None:
    value = await token("build:write namespace:read,write")
    await api.post(
        "/api/namespaces",
        headers=bearer(value),
        json={"name": "team", "description": "The team's builds", "visibility": "private"},
    )
    await api.post(
        "/api/namespaces", headers=bearer(value), json={"name": "open", "visibility": "public"}
    )
    build = await submit(api, value, "namespace: team\n" + MANIFEST)
    bob = await make_user("bob")
    bobs = await token("namespace:write", user=bob)
    await api.post("/api/namespaces", headers=bearer(bobs), json={"name": "bobs"})
    await browser.sign_in()
    _, html = await browser.get("/namespaces")
    assert 'href="/n/alice/team"' in html and 'href="/n/alice/open"' in html
    assert "bobs" not in html
    resp, html = await browser.get("/n/alice/team")
    assert resp.status == 200 and "The team&#39;s builds" in html
    assert f'href="/b/alice/{build["number"]}"' in html
    assert "<h2>Collaborators</h2>" in html  # the owner sees them
    resp, html = await browser.get("/n/bob/bobs")
    assert resp.status == 404 and "<h1>Not found</h1>" in html
    signed_out = Browser(browser.client)
    resp, _ = await signed_out.get("/n/alice/open")
    assert resp.status == 200
    resp, html = await signed_out.get("/n/alice/team")
    assert resp.status == 404 and "<h1>Not found</h1>" in html


async def test_a_token_is_created_from_the_page_shown_once_and_revoked(
    browser: Browser, api: TestClient, alice: users.User, pool: asyncpg.Pool
) -> None:
    await browser.sign_in()
    resp, html = await browser.get("/tokens")
    assert resp.status == 200 and "No tokens yet" in html
    csrf = hidden(html, "csrf")
    resp, _ = await browser.post("/tokens", {"name": "ci"})
    assert resp.status == 403
    resp, html = await browser.post("/tokens", {"csrf": csrf, "name": "ci"})
    assert resp.status == 400 and "Choose at least one permission" in html
    resp = await browser.client.post(
        "/tokens",
        data=[("csrf", csrf), ("name", "ci"), ("scope", "build:read"), ("scope", "build:write"),
              ("scope", "namespace:read")],
        headers=browser._headers(),
    )  # fmt: skip
    html = await resp.text()
    assert resp.status == 201
    value = re.search(r'<code id="new-token" class="secret">(mrd_[0-9a-f]+)</code>', html)
    assert value, html
    assert "<code>build:read,write namespace:read</code>" in html
    me = await api.get("/api/user", headers=bearer(value.group(1)))
    assert me.status == 200  # the token works
    resp, html = await browser.get("/tokens")
    assert value.group(1) not in html  # never shown again
    async with pool.acquire() as conn:
        token_id = await conn.fetchval("SELECT id FROM tokens WHERE name = 'ci'")
    resp, _ = await browser.post(f"/tokens/{token_id}/delete", {"csrf": csrf})
    assert resp.status == 303
    assert (await api.get("/api/user", headers=bearer(value.group(1)))).status == 404


async def test_the_runner_scope_is_offered_to_administrators_alone(
    browser: Browser, aiohttp_client: Any, config: Config, pool: asyncpg.Pool, alice: users.User
) -> None:
    await browser.sign_in()
    _, html = await browser.get("/tokens")
    assert 'value="app:delete"' in html and 'value="runner:read"' not in html
    server = dataclasses.replace(config.server, admins=["alice"])
    admin = Browser(
        await aiohttp_client(create_app(dataclasses.replace(config, server=server), pool))
    )
    await admin.sign_in()
    _, html = await admin.get("/tokens")
    assert all(f'value="runner:{p}"' in html for p in ("read", "write", "delete"))


async def test_cron_jobs_are_created_shown_with_their_next_run_and_deleted(
    browser: Browser, api: TestClient, token: MakeToken, make_user: MakeUser, alice: users.User
) -> None:
    bob = await make_user("bob")
    bobs = await token("cron:write", user=bob)
    resp = await api.post(
        "/api/cron", headers=bearer(bobs), json={"name": "bobs", "manifest": MANIFEST}
    )
    assert resp.status == 201
    bobs_id = (await resp.json())["id"]
    await browser.sign_in()
    resp, html = await browser.get("/cron")
    assert resp.status == 200 and "No cron jobs" in html
    csrf = hidden(html, "csrf")
    form = {"csrf": csrf, "name": "nightly", "schedule": "0 3 * *", "timezone": "Mars/Base",
            "manifest": MANIFEST}  # fmt: skip
    resp, html = await browser.post("/cron", form)
    assert resp.status == 400
    assert re.search(r'id="schedule-errors"><li>', html)
    assert re.search(r'id="timezone-errors"><li>Timezone unknown time zone Mars/Base', html)
    # Half a day ahead, whatever the time of the run: the page says `in 11h 40m`, never
    # `in 20m` (a fixed 03:00 read so between 02:00 and 03:00 UTC).
    hour = (datetime.now(UTC).hour + 12) % 24
    schedule = f"0 {hour} * * *"
    resp, _ = await browser.post("/cron", {**form, "schedule": schedule, "timezone": "UTC"})
    assert resp.status == 303
    cron_path = resp.headers["Location"]
    resp, html = await browser.get(cron_path)
    assert resp.status == 200 and "<h1>nightly</h1>" in html
    assert re.search(r'<dd id="next-run"><time datetime="[^"]+">in \d+h \d+m</time>', html)
    _, listing = await browser.get("/cron")
    assert f'href="{cron_path}">nightly</a>' in listing and "bobs" not in listing
    resp, html = await browser.get(f"/cron/{bobs_id}")
    assert resp.status == 404 and "<h1>Not found</h1>" in html
    resp, _ = await browser.post(f"/cron/{bobs_id}/delete", {"csrf": csrf})
    assert resp.status == 404
    resp, _ = await browser.post(f"{cron_path}/delete", {"csrf": csrf})
    assert resp.status == 303
    _, listing = await browser.get("/cron")
    assert "No cron jobs" in listing


async def test_ssh_keys_are_stored_from_the_page_and_their_private_part_never_shown(
    browser: Browser, alice: users.User, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    command = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")]
    await asyncio.to_thread(subprocess.run, command, check=True)
    private = (tmp_path / "k").read_text()
    await browser.sign_in()
    resp, html = await browser.get("/keys")
    assert resp.status == 200 and "No SSH keys" in html
    csrf = hidden(html, "csrf")
    resp, html = await browser.post(
        "/keys", {"csrf": csrf, "name": "bad name!", "key": "not a key"}
    )
    assert resp.status == 400 and 'id="name-errors"' in html and 'id="key-errors"' in html
    resp, html = await browser.post(
        "/keys", {"csrf": csrf, "name": "deploy", "key": private, "config": "Host example"}
    )
    assert resp.status == 303, html
    _, html = await browser.get("/keys")
    assert "<code>deploy</code>" in html and "Host example" in html
    assert "PRIVATE KEY" not in html and private.splitlines()[1] not in html
    async with pool.acquire() as conn:
        key_id = await conn.fetchval("SELECT id FROM ssh_keys WHERE name = 'deploy'")
    resp, _ = await browser.post(f"/keys/{key_id}/delete", {"csrf": csrf})
    assert resp.status == 303
    _, html = await browser.get("/keys")
    assert "No SSH keys" in html


async def test_objects_are_uploaded_downloaded_and_deleted_from_the_page(
    browser: Browser, api: TestClient, token: MakeToken, alice: users.User
) -> None:
    await browser.sign_in()
    resp, html = await browser.get("/objects")
    assert resp.status == 200 and "No objects" in html
    csrf = hidden(html, "csrf")

    def form(**fields: str | bytes) -> aiohttp.FormData:
        data = aiohttp.FormData()
        for name, value in fields.items():
            if name == "file":
                data.add_field("file", value, filename="notes.html", content_type="text/html")
            else:
                data.add_field(name, value)
        return data

    page = b"<html><script>alert(1)</script></html>"
    resp = await api.post(
        "/objects", data=form(name="notes", file=page), headers=browser._headers()
    )
    assert resp.status == 403
    resp = await api.post(
        "/objects", data=form(csrf=csrf, name="bad name", file=page), headers=browser._headers()
    )
    assert resp.status == 400 and 'id="name-errors"' in await resp.text()
    resp = await api.post(
        "/objects",
        data=form(csrf=csrf, name="notes", file=page),
        headers=browser._headers(),
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    listed = await (
        await api.get("/api/objects", headers=bearer(await token("object:read")))
    ).json()
    (found,) = listed
    _, html = await browser.get("/objects")
    assert f'href="/objects/{found["id"]}/download" download>notes<' in html
    resp, body = await browser.get(f"/objects/{found['id']}/download")
    assert resp.status == 200 and body.encode() == page
    assert resp.headers["Content-Disposition"] == "attachment; filename*=UTF-8''notes"
    assert resp.headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    resp, _ = await browser.post(f"/objects/{found['id']}/delete", {"csrf": csrf})
    assert resp.status == 303
    _, html = await browser.get("/objects")
    assert "No objects" in html


async def test_collaborators_are_invited_accepted_and_removed_from_the_pages(
    api: TestClient, token: MakeToken, make_user: MakeUser, alice: users.User
) -> None:
    value = await token("build:write namespace:read,write")
    await api.post("/api/namespaces", headers=bearer(value), json={"name": "team"})
    build = await submit(api, value, "namespace: team\n" + MANIFEST)
    await make_user("bob")
    await make_user("carol")
    owner, bob = Browser(api), Browser(api)
    await owner.sign_in()
    await bob.sign_in("bob")
    _, html = await owner.get("/n/alice/team")
    csrf = hidden(html, "csrf")
    resp, html = await owner.post("/n/alice/team/-/invites", {"csrf": csrf, "handle": "nobody"})
    assert resp.status == 400 and 'id="handle-errors"' in html
    resp, _ = await owner.post("/n/alice/team/-/invites", {"handle": "bob"})
    assert resp.status == 403
    for handle in ("bob", "carol"):
        resp, _ = await owner.post("/n/alice/team/-/invites", {"csrf": csrf, "handle": handle})
        assert resp.status == 303 and resp.headers["Location"] == "/n/alice/team"
    _, html = await owner.get("/n/alice/team")
    withdraw = re.findall(r'<form method="post" action="(/invites/\d+)/delete"', html)
    assert len(withdraw) == 2 and "carol" in html
    resp, _ = await owner.post(
        f"{withdraw[1]}/delete", {"csrf": csrf, "back": "/n/alice/team"}
    )  # carol's, withdrawn
    assert resp.status == 303 and resp.headers["Location"] == "/n/alice/team"
    resp, html = await bob.get(f"/b/alice/{build['number']}")
    assert resp.status == 404  # not yet a collaborator
    _, html = await bob.get("/invites")
    assert "alice/team" in html
    accept = re.search(r'action="(/invites/\d+/accept)"', html)
    assert accept
    resp, _ = await bob.post(accept.group(1), {"csrf": hidden(html, "csrf")})
    assert resp.status == 303
    resp, _ = await bob.get(f"/b/alice/{build['number']}")
    assert resp.status == 200  # a collaborator reads the namespace's builds
    _, html = await owner.get("/n/alice/team")
    assert '<span class="who-name">bob</span>' in html and "carol" not in html
    resp, _ = await owner.post("/n/alice/team/-/collaborators/bob/delete", {"csrf": csrf})
    assert resp.status == 303
    resp, _ = await bob.get(f"/b/alice/{build['number']}")
    assert resp.status == 404
    resp, html = await bob.post("/n/alice/team/-/invites", {"csrf": csrf, "handle": "carol"})
    assert resp.status in (403, 404)  # bob's form token is not alice's; nor is he an admin


async def test_a_build_is_tagged_and_untagged_from_its_page(
    browser: Browser, api: TestClient, token: MakeToken, make_user: MakeUser, alice: users.User
) -> None:
    value = await token("build:read,write")
    build = await submit(api, value, MANIFEST)
    path = f"/b/alice/{build['number']}"
    await browser.sign_in()
    _, html = await browser.get(path)
    csrf = hidden(html, "csrf")
    resp, _ = await browser.post(f"{path}/tags", {"tags": "x"})
    assert resp.status == 403
    resp, _ = await browser.post(f"{path}/tags", {"csrf": csrf, "tags": "release, v1.2 v1.2"})
    assert resp.status == 303 and resp.headers["Location"] == path
    shown = await (await api.get(f"/api{path}", headers=bearer(value))).json()
    assert sorted(shown["tags"]) == ["release", "v1.2"]
    resp, _ = await browser.post(f"{path}/tags/release/delete", {"csrf": csrf})
    assert resp.status == 303
    shown = await (await api.get(f"/api{path}", headers=bearer(value))).json()
    assert shown["tags"] == ["v1.2"]
    await make_user("bob")
    other = Browser(api)
    await other.sign_in("bob")
    _, bob_html = await other.get("/builds")
    resp, html = await other.post(f"{path}/tags", {"csrf": hidden(bob_html, "csrf"), "tags": "x"})
    assert resp.status == 404 and "<h1>Not found</h1>" in html


async def test_images_are_uploaded_checked_and_deleted_from_the_page(
    browser: Browser, api: TestClient, alice: users.User, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.qcow2"
    command = ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"]
    await asyncio.to_thread(subprocess.run, command, check=True)
    await browser.sign_in()
    resp, html = await browser.get("/images")
    assert resp.status == 200 and "No images" in html
    csrf = hidden(html, "csrf")

    def form(name: str, content: bytes) -> aiohttp.FormData:
        data = aiohttp.FormData()
        for field, value in (("csrf", csrf), ("name", name), ("driver", "qemu")):
            data.add_field(field, value)
        data.add_field("file", content, filename="disk.qcow2")
        return data

    resp = await api.post("/images", data=form("debian", b"not a disk"), headers=browser._headers())
    assert resp.status == 400
    assert "File not a valid QCOW2 file format" in await resp.text()
    resp = await api.post(
        "/images",
        data=form("debian", disk.read_bytes()),
        headers=browser._headers(),
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    _, html = await browser.get("/images")
    assert "<code>debian</code>" in html and "uploaded" in html
    async with pool.acquire() as conn:
        image_id = await conn.fetchval("SELECT id FROM images WHERE name = 'debian'")
    resp, _ = await browser.post(f"/images/{image_id}/delete", {"csrf": csrf})
    assert resp.status == 303
    _, html = await browser.get("/images")
    assert "No images" in html


async def test_an_oauth_app_is_registered_its_secret_shown_once_and_deleted(
    browser: Browser, alice: users.User, pool: asyncpg.Pool
) -> None:
    await browser.sign_in()
    resp, html = await browser.get("/apps")
    assert resp.status == 200 and "No apps registered" in html
    csrf = hidden(html, "csrf")
    app = {"csrf": csrf, "name": "ci-bot", "homepage_uri": "https://bot.example.com",
           "redirect_uri": "javascript:alert(1)"}  # fmt: skip
    resp, html = await browser.post("/apps", app)
    assert resp.status == 400 and 'id="redirect_uri-errors"' in html
    resp, html = await browser.post(
        "/apps", {**app, "redirect_uri": "https://bot.example.com/callback"}
    )
    assert resp.status == 201
    client_id = re.search(r'<code id="new-client-id">([^<]+)</code>', html)
    secret = re.search(r'<code id="new-client-secret" class="secret">([^<]+)</code>', html)
    assert client_id and secret
    _, html = await browser.get("/apps")
    assert client_id.group(1) in html and secret.group(1) not in html
    async with pool.acquire() as conn:
        stored = await conn.fetchval("SELECT count(*) FROM apps WHERE name = 'ci-bot'")
    assert stored == 1
    resp, _ = await browser.post(f"/apps/{client_id.group(1)}/delete", {"csrf": csrf})
    assert resp.status == 303
    _, html = await browser.get("/apps")
    assert "No apps registered" in html


def _post_paths() -> list[str]:
    """Every POST route of the pages, its parameters filled in (no such resource needed: the
    CSRF check comes first)."""
    fill = {"username": "alice", "number": "1", "name": "s.1", "id": "1", "path": "team",
            "handle": "bob", "client_id": "x"}  # fmt: skip
    paths = []
    for route in web_pages.routes:
        if isinstance(route, web.RouteDef) and route.method == "POST":
            path = re.sub(
                r"\{(\w+)(?::[^{}]*(?:\{[^}]*\}[^{}]*)*)?\}", lambda m: fill[m[1]], route.path
            )
            paths.append(path)
    return paths


@pytest.mark.parametrize("path", _post_paths())
async def test_every_form_is_refused_without_its_csrf_token(
    browser: Browser, alice: users.User, path: str
) -> None:
    await browser.sign_in()
    if path in ("/objects", "/images"):  # multipart forms
        data = aiohttp.FormData()
        data.add_field("name", "x")
        data.add_field("file", b"x", filename="x")
        resp = await browser.client.post(
            path, data=data, headers=browser._headers(), allow_redirects=False
        )
    else:
        resp, _ = await browser.post(path, {"name": "x"})
    assert resp.status == 403, (path, await resp.text())


HOSTILE_GETS = [
    "/builds?page=abc&status=nope&namespace=../../etc&tag=%00",
    "/builds?search=%00",
    "/b/alice/99999999999999999999999",
    "/b/alice/1/jobs/%00",
    "/b/alice/1/jobs/..%2F..%2Fetc",
    "/b/alice/1/artifacts/..%2F..%2Fetc%2Fpasswd",
    "/n/alice/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t/u/v/w/x/y/z",
    "/cron/99999999999999999999",
    "/objects/1/download",
    "/b/alice/1/jobs/s.1/live?offset=-5",
    "/b/alice/1/jobs/s.1/raw?offset=abc",
    "/signin?next=%00",
]


@pytest.mark.parametrize("path", HOSTILE_GETS)
async def test_hostile_requests_to_the_pages_get_a_clear_answer_never_a_500(
    browser: Browser, alice: users.User, path: str
) -> None:
    await browser.sign_in()
    resp, body = await browser.get(path)
    assert resp.status < 500, (path, body[:300])


async def test_hostile_forms_get_a_clear_answer_never_a_500(
    browser: Browser, api: TestClient, alice: users.User
) -> None:
    await browser.sign_in()
    _, html = await browser.get("/builds/new")
    csrf = hidden(html, "csrf")
    token, form = b"csrf=" + csrf.encode(), "application/x-www-form-urlencoded"
    cases = [
        ("/builds/new", form, token + b"&manifest=%ff%fe"),
        ("/builds/new", form, token + b"&manifest=a%00b"),
        ("/variables", form, b"%%%"),
        ("/objects", "multipart/form-data", b"--x\r\nnot a part"),
        ("/objects", "multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: x\r\n\r\n"),
        ("/keys", form, token + b"&name=k&key=" + b"A" * 60000),
    ]
    for path, content_type, body in cases:
        resp = await api.post(
            path,
            data=body,
            headers={**browser._headers(), "Content-Type": content_type},
            allow_redirects=False,
        )
        assert resp.status < 500, (path, body[:40], await resp.text())
        assert resp.status in (400, 403, 413, 415), (path, resp.status)
