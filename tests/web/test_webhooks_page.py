"""A namespace's webhooks on the web (issue 13): created with the API's rules and outbound
policy, and their delivery log as real deliveries to a receiver on loopback fill it."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid import outbound, users
from marid.scheduler import hooks
from tests.api.helpers import create_namespace
from tests.conftest import MakeToken, MakeUser
from tests.runner.test_worker import submit
from tests.scheduler.test_hooks import Receiver, deliver, receiver  # noqa: F401 (a fixture)
from tests.web.test_pages import MANIFEST, Browser, hidden

PAGE = "/n/alice/team/-/webhooks"


@pytest.fixture
def config(config: config_module.Config) -> config_module.Config:
    """The receiver listens on loopback: allowed, as in tests/scheduler/test_hooks.py."""
    return dataclasses.replace(config, outbound=config_module.OutboundConfig(["127.0.0.0/8"]))


@pytest.fixture
async def client(config: config_module.Config) -> AsyncIterator[aiohttp.ClientSession]:
    async with hooks.session(config.webhooks, outbound.Policy.from_config(config)) as session:
        yield session


async def test_a_webhook_is_created_and_its_deliveries_are_shown(
    api: TestClient,
    token: MakeToken,
    make_user: MakeUser,
    alice: users.User,
    receiver: Receiver,  # noqa: F811
    client: aiohttp.ClientSession,
    config: config_module.Config,
    pool: asyncpg.Pool,
) -> None:
    value = await token("build:write namespace:read,write")
    await create_namespace(api, value, "team")
    browser = Browser(api)
    await browser.sign_in()
    resp, html = await browser.get(PAGE)
    assert resp.status == 200 and "No webhooks." in html
    csrf = hidden(html, "csrf")
    resp, _ = await browser.post(PAGE, {"payload_url": receiver.url})
    assert resp.status == 403
    resp, html = await browser.post(PAGE, {"csrf": csrf, "payload_url": "http://10.1.2.3/hook"})
    assert resp.status == 400
    errors = re.search(r'id="payload_url-errors"><li>([^<]*)', html)
    assert errors and "refused by policy" in errors.group(1)
    form = {"csrf": csrf, "payload_url": receiver.url, "secret": "s3cret", "active": "on"}
    resp, html = await browser.post(PAGE, form)
    assert resp.status == 303, html
    _, html = await browser.get(PAGE)
    link = re.search(r'<a class="webhook-link" href="([^"]+)">([^<]+)</a>', html)
    assert link and link.group(2) == receiver.url
    assert "s3cret" not in html
    await submit(api, value, "namespace: team\n" + MANIFEST)  # build.submitted, queued
    assert await deliver(pool, client, config, datetime.now(UTC)) == 1
    assert len(receiver.got) == 1
    resp, html = await browser.get(link.group(1))
    assert resp.status == 200
    row = re.search(r'<tr class="delivery">(.*?)</tr>', html, re.S)
    assert row and "build.submitted" in row.group(1) and ">200</code>" in row.group(1)
    assert "delivered" in row.group(1)
    # bob, who does not work in the namespace, sees neither page
    await make_user("bob")
    other = Browser(api)
    await other.sign_in("bob")
    for path in (PAGE, link.group(1)):
        resp, html = await other.get(path)
        assert resp.status == 404 and "<h1>Not found</h1>" in html
    resp, _ = await browser.post(link.group(1) + "/delete", {"csrf": csrf})
    assert resp.status == 303 and resp.headers["Location"] == PAGE
    _, html = await browser.get(PAGE)
    assert "No webhooks." in html
