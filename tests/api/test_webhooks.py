"""Webhooks through the API (docs/api.md §10): the entity, its rules, and the events queued."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid import webhooks
from marid.crypto import Cipher
from marid.users import User
from tests.api.helpers import BASE, add_collaborator, create_namespace, user_json
from tests.api.test_keys import ed25519_key
from tests.conftest import MakeToken, MakeUser, bearer

ALL = (
    "webhook:read,write,delete namespace:read,write,delete build:read,write,delete "
    "invite:read,write,delete variable:read,write,delete key:read,write,delete "
    "object:read,write,delete image:read,write,delete cron:read,write,delete"
)
HOOKS = "/api/n/alice/team/-/webhooks"
URL = "https://hooks.example.org/ci"
PRIVATE_KEY = ed25519_key()
MANIFEST = (
    "driver: {type: os}\nnamespace: team\nstages: [s]\njobs: [{stage: s, commands: [true]}]\n"
)
VARIABLE = {"key": "K", "value": "v", "namespace": "team"}
KEY = "test-crypto-key-" + "0" * 32
SCHEME = {"payload_url": ["Payload URL missing http or https scheme"]}
LOCAL = {"payload_url": ["Payload URL cannot be localhost"]}


def refused(host: str, reason: str) -> dict[str, list[str]]:
    return {
        "payload_url": [f"Payload URL {host} is refused by policy ({reason}); see outbound.allow"]
    }


@pytest.fixture
def config(config: config_module.Config) -> config_module.Config:
    """The os driver is accepted so builds can be submitted (none runs in these tests)."""
    return dataclasses.replace(config, drivers=["docker", "os"])


@pytest.fixture
async def owner(api: TestClient, token: MakeToken, alice: User) -> str:
    """alice's full token, with her namespace `team`."""
    value = await token(ALL)
    await create_namespace(api, value, "team")
    return value


async def create(api: TestClient, token: str, path: str = HOOKS, **fields: Any) -> tuple[int, Any]:
    resp = await api.post(path, headers=bearer(token), json=fields)
    return resp.status, await resp.json()


async def queued(pool: asyncpg.Pool) -> list[tuple[int, str, Any]]:
    """(webhook id, event, payload) of every queued delivery, oldest first."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT webhook_id, event, body FROM webhook_deliveries ORDER BY id"
        )
    return [(row["webhook_id"], row["event"], json.loads(row["body"])) for row in rows]


async def test_create_returns_the_entity_without_the_secret(
    api: TestClient, owner: str, alice: User, pool: asyncpg.Pool
):
    status, body = await create(
        api, owner, payload_url=URL, secret="s3cret", ssl=True, events=["build.finished"]
    )
    assert status == 201, body
    ns = await (await api.get("/api/n/alice/team", headers=bearer(owner))).json()
    assert body == {
        "id": body["id"],
        "user_id": alice.id,
        "author_id": alice.id,
        "namespace_id": ns["id"],
        "payload_url": URL,
        "ssl": True,
        "active": True,
        "events": ["build.finished"],
        "url": f"{BASE}/n/alice/team/-/webhooks/{body['id']}",
        "namespace": {**ns, "build": None},
        "last_response": None,
    }
    async with pool.acquire() as conn:
        sealed = await conn.fetchval("SELECT secret_sealed FROM webhooks WHERE id = $1", body["id"])
    assert b"s3cret" not in sealed
    cipher = Cipher(KEY)
    assert webhooks.secret_of(cipher, body["id"], sealed) == "s3cret"
    listed = await (await api.get(HOOKS, headers=bearer(owner))).json()
    assert listed == [body]
    shown = await (await api.get(f"{HOOKS}/{body['id']}", headers=bearer(owner))).json()
    assert shown == body


async def test_events_default_to_all_in_spec_order(api: TestClient, owner: str):
    _, every = await create(api, owner, payload_url=URL)
    assert every["events"] == list(webhooks.EVENTS)
    assert every["ssl"] is False and every["active"] is True
    _, empty = await create(api, owner, payload_url=URL + "/2", events=[])
    assert empty["events"] == list(webhooks.EVENTS)
    _, some = await create(
        api, owner, payload_url=URL + "/3", events=["objects", "build.started", "objects"]
    )
    assert some["events"] == ["build.started", "objects"]


@pytest.mark.parametrize(
    ("fields", "errors"),
    [
        ({}, {"payload_url": ["Payload URL field required"]}),
        ({"payload_url": ""}, {"payload_url": ["Payload URL field required"]}),
        ({"payload_url": "ftp://x.org/"}, SCHEME),
        ({"payload_url": "hooks.example.org"}, SCHEME),
        ({"payload_url": "http://:80/x"}, {"payload_url": ["Payload URL missing host"]}),
        ({"payload_url": "http://localhost:9000/"}, LOCAL),
        ({"payload_url": "http://127.3.4.5/"}, LOCAL),
        ({"payload_url": "http://[::1]:8080/"}, LOCAL),
        ({"payload_url": "http://[::ffff:127.0.0.1]/"}, LOCAL),
        ({"payload_url": "http://0.0.0.0/"}, LOCAL),
        ({"payload_url": "http://127.1:8080/"}, LOCAL),
        ({"payload_url": "http://0x7f000001/"}, LOCAL),
        ({"payload_url": "http://2130706433/"}, LOCAL),
        ({"payload_url": "http://017700000001/"}, LOCAL),
        ({"payload_url": "http://a.localhost./"}, LOCAL),
        ({"payload_url": "http://10.0.0.1/"}, refused("10.0.0.1", "private")),
        ({"payload_url": "http://10.1/"}, refused("10.0.0.1", "private")),
        ({"payload_url": "http://100.64.0.1/"}, refused("100.64.0.1", "private")),
        ({"payload_url": "http://192.168.0.1/"}, refused("192.168.0.1", "private")),
        ({"payload_url": "http://169.254.169.254/latest"},
         refused("169.254.169.254", "link-local")),
        ({"payload_url": "http://[fe80::1]/"}, refused("fe80::1", "link-local")),
        ({"payload_url": "http://[fd12::1]/"}, refused("fd12::1", "unique-local")),
        ({"payload_url": "http://[::ffff:10.0.0.1]/"}, refused("::ffff:a00:1", "private")),
        ({"payload_url": "http://224.0.0.1/"}, refused("224.0.0.1", "multicast")),
        ({"payload_url": "http://x.org/", "ssl": True},
         {"payload_url": ["Payload URL cannot use SSL for plain http URL"]}),
        ({"payload_url": 5}, {"payload_url": ["Payload URL must be a string"]}),
        ({"payload_url": URL, "secret": 1, "ssl": "yes", "active": 0},
         {"secret": ["Secret must be a string"], "ssl": ["SSL must be a boolean"],
          "active": ["Active must be a boolean"]}),
        ({"payload_url": URL, "events": ["build.finished", "build.exploded", "push"]},
         {"events": ["Events unknown event build.exploded", "Events unknown event push"]}),
        ({"payload_url": URL, "events": "objects"},
         {"events": ["Events must be an array of strings"]}),
    ],
)  # fmt: skip
async def test_create_rules(
    api: TestClient, owner: str, pool: asyncpg.Pool, fields: dict[str, Any], errors: Any
):
    status, body = await create(api, owner, **fields)
    assert (status, body) == (400, errors)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM webhooks") == 0


async def test_payload_url_is_unique_per_namespace(api: TestClient, owner: str):
    assert (await create(api, owner, payload_url=URL))[0] == 201
    assert await create(api, owner, payload_url=URL) == (
        400,
        {"payload_url": ["Payload URL already exists"]},
    )
    await create_namespace(api, owner, "other")
    status, _ = await create(api, owner, "/api/n/alice/other/-/webhooks", payload_url=URL)
    assert status == 201


async def test_loopback_is_allowed_when_the_config_says_so(
    aiohttp_client: Any, config: config_module.Config, pool: asyncpg.Pool, token: MakeToken
):
    """The legacy switch adds loopback to outbound.allow, and nothing else."""
    from marid.api.app import create_app

    allowing = dataclasses.replace(
        config, webhooks=config_module.WebhooksConfig(allow_loopback=True)
    )
    client = await aiohttp_client(create_app(allowing, pool))
    value = await token(ALL)
    await create_namespace(client, value, "team")
    for url in ("http://127.0.0.1:9/hook", "http://localhost/", "http://[::1]/", "http://127.1/"):
        status, body = await create(client, value, payload_url=url)
        assert status == 201, body
    assert await create(client, value, payload_url="http://10.0.0.1/") == (
        400,
        refused("10.0.0.1", "private"),
    )


async def test_outbound_allow_opens_exactly_what_it_lists(
    aiohttp_client: Any, config: config_module.Config, pool: asyncpg.Pool, token: MakeToken
):
    from marid.api.app import create_app

    outbound = config_module.OutboundConfig(["10.1.0.0/16", "127.0.0.2", "hooks.internal"])
    client = await aiohttp_client(create_app(dataclasses.replace(config, outbound=outbound), pool))
    value = await token(ALL)
    await create_namespace(client, value, "team")
    for url in ("http://10.1.2.3/", "http://10.1.515/", "http://127.0.0.2:8/",
                "http://hooks.internal/", "http://[::ffff:10.1.0.9]/"):  # fmt: skip
        status, body = await create(client, value, payload_url=url)
        assert status == 201, (url, body)
    assert await create(client, value, payload_url="http://10.2.0.1/") == (
        400,
        refused("10.2.0.1", "private"),
    )
    assert await create(client, value, payload_url="http://127.0.0.1/") == (400, LOCAL)
    # PATCH applies the same rules.
    _, hook = await create(client, value, payload_url=URL)
    resp = await client.patch(
        f"{HOOKS}/{hook['id']}", headers=bearer(value), json={"payload_url": "http://10.0.0.1/"}
    )
    assert (resp.status, await resp.json()) == (400, refused("10.0.0.1", "private"))


async def test_patch_changes_only_what_is_given(api: TestClient, owner: str, pool: asyncpg.Pool):
    _, hook = await create(api, owner, payload_url=URL, secret="one", events=["objects"])
    path = f"{HOOKS}/{hook['id']}"

    async def patch(**fields: Any) -> tuple[int, Any]:
        resp = await api.patch(path, headers=bearer(owner), json=fields)
        return resp.status, await resp.json()

    async def secret() -> str | None:
        async with pool.acquire() as conn:
            sealed = await conn.fetchval(
                "SELECT secret_sealed FROM webhooks WHERE id = $1", hook["id"]
            )
        return webhooks.secret_of(Cipher("test-crypto-key-" + "0" * 32), hook["id"], sealed)

    status, body = await patch(active=False)
    assert status == 200
    assert body == {**hook, "active": False}
    assert await secret() == "one"
    assert (await patch(secret=""))[0] == 200
    assert await secret() == "one"  # "" leaves it alone
    assert (await patch(secret="two"))[0] == 200
    assert await secret() == "two"
    assert (await patch(remove_secret=True))[0] == 200
    assert await secret() is None
    _, body = await patch(events=[])
    assert body["events"] == list(webhooks.EVENTS)
    assert await patch(ssl=True) == (200, {**body, "ssl": True})
    await create(api, owner, payload_url="https://b.example.org/")
    assert await patch(payload_url="https://b.example.org/") == (
        400,
        {"payload_url": ["Payload URL already exists"]},
    )
    assert (await patch(payload_url=URL))[0] == 200  # its own URL is no conflict
    assert await patch(payload_url="http://plain.example.org/") == (
        400,
        {"payload_url": ["Payload URL cannot use SSL for plain http URL"]},
    )
    assert await patch(remove_secret="yes") == (
        400,
        {"remove_secret": ["Remove secret must be a boolean"]},
    )


async def test_webhooks_are_for_owners_and_collaborators_only(
    api: TestClient, owner: str, token: MakeToken, make_user: MakeUser
):
    bob, carol = await make_user("bob"), await make_user("carol")
    bob_token, carol_token = await token(ALL, user=bob), await token(ALL, user=carol)
    await add_collaborator(api, owner, "team", "alice", bob_token, "bob")
    status, hook = await create(api, bob_token, payload_url=URL)
    assert status == 201
    assert hook["author_id"] == bob.id and hook["user_id"] != bob.id
    path = f"{HOOKS}/{hook['id']}"
    for method in ("GET", "PATCH", "DELETE"):
        resp = await api.request(method, path, headers=bearer(carol_token), json={})
        assert resp.status == 404, method
    # An id of another namespace's webhook is 404 under this one.
    await create_namespace(api, owner, "other")
    resp = await api.get(f"/api/n/alice/other/-/webhooks/{hook['id']}", headers=bearer(owner))
    assert resp.status == 404
    # Public namespaces do not open them up.
    await api.patch("/api/n/alice/team", headers=bearer(owner), json={"visibility": "public"})
    assert (await api.get(HOOKS, headers=bearer(carol_token))).status == 404


async def test_delete_removes_the_webhook_and_its_records(
    api: TestClient, owner: str, pool: asyncpg.Pool
):
    _, hook = await create(api, owner, payload_url=URL, events=["variables"])
    resp = await api.post(
        "/api/variables",
        headers=bearer(owner),
        json={"key": "K", "value": "v", "namespace": "team"},
    )
    assert resp.status == 201
    assert len(await queued(pool)) == 1
    resp = await api.delete(f"{HOOKS}/{hook['id']}", headers=bearer(owner))
    assert resp.status == 204
    assert await queued(pool) == []
    assert (await api.get(f"{HOOKS}/{hook['id']}", headers=bearer(owner))).status == 404


async def test_only_active_subscribed_webhooks_of_that_exact_namespace_get_events(
    api: TestClient, owner: str, pool: asyncpg.Pool
):
    _, wanted = await create(api, owner, payload_url=URL, events=["variables"])
    await create(api, owner, payload_url=URL + "/other-events", events=["objects"])
    await create(api, owner, payload_url=URL + "/inactive", active=False)
    await create_namespace(api, owner, "sub", parent="team")
    _, child = await create(api, owner, "/api/n/alice/team/sub/-/webhooks", payload_url=URL)
    for namespace in ("team/sub", None):  # a child's variable, a personal one
        fields = {"key": "K", "value": "v", **({"namespace": namespace} if namespace else {})}
        resp = await api.post("/api/variables", headers=bearer(owner), json=fields)
        assert resp.status == 201
    assert [(h, e) for h, e, _ in await queued(pool)] == [(child["id"], "variables")]
    resp = await api.post(
        "/api/variables",
        headers=bearer(owner),
        json={"key": "K", "value": "v", "namespace": "team"},
    )
    assert [(h, e) for h, e, _ in await queued(pool)] == [
        (child["id"], "variables"),
        (wanted["id"], "variables"),
    ]


async def test_resource_events_carry_the_entity_as_the_api_returned_it(
    api: TestClient, owner: str, pool: asyncpg.Pool
):
    _, hook = await create(api, owner, payload_url=URL)
    h = hook["id"]
    resp = await api.post(
        "/api/variables",
        headers=bearer(owner),
        json={"key": "K", "value": "v", "namespace": "team"},
    )
    variable = await resp.json()
    await api.delete(f"/api/variables/{variable['id']}", headers=bearer(owner))
    resp = await api.post(
        "/api/objects", headers=bearer(owner), params={"name": "o", "namespace": "team"}, data=b"hi"
    )
    obj = await resp.json()
    await api.delete(f"/api/objects/{obj['id']}", headers=bearer(owner))
    qcow2 = b"QFI\xfb" + bytes(64)
    resp = await api.post(
        "/api/images", headers=bearer(owner), params={"name": "i", "namespace": "team"}, data=qcow2
    )
    image = await resp.json()
    await api.delete(f"/api/images/{image['id']}", headers=bearer(owner))
    resp = await api.post(
        "/api/keys",
        headers=bearer(owner),
        json={"name": "k", "key": PRIVATE_KEY, "namespace": "team"},
    )
    key = await resp.json()
    resp = await api.patch(f"/api/keys/{key['id']}", headers=bearer(owner), json={"config": "x"})
    key_updated = await resp.json()
    await api.delete(f"/api/keys/{key['id']}", headers=bearer(owner))
    resp = await api.post(
        "/api/cron", headers=bearer(owner), json={"name": "c", "manifest": MANIFEST}
    )
    cron = await resp.json()
    resp = await api.patch(
        f"/api/cron/{cron['id']}", headers=bearer(owner), json={"schedule": "weekly"}
    )
    cron_updated = await resp.json()
    await api.delete(f"/api/cron/{cron['id']}", headers=bearer(owner))
    assert await queued(pool) == [
        (h, "variables", {"action": "created", "variable": variable}),
        (h, "variables", {"action": "deleted", "variable": variable}),
        (h, "objects", {"action": "created", "object": obj}),
        (h, "objects", {"action": "deleted", "object": obj}),
        (h, "images", {"action": "created", "image": image}),
        (h, "images", {"action": "deleted", "image": image}),
        (h, "ssh_keys", {"action": "created", "key": key}),
        (h, "ssh_keys", {"action": "updated", "key": key_updated}),
        (h, "ssh_keys", {"action": "deleted", "key": key_updated}),
        (h, "cron", {"action": "created", "cron": cron}),
        (h, "cron", {"action": "updated", "cron": cron_updated}),
        (h, "cron", {"action": "deleted", "cron": cron_updated}),
    ]


async def test_build_events(api: TestClient, owner: str, pool: asyncpg.Pool, alice: User):
    _, hook = await create(api, owner, payload_url=URL)
    h = hook["id"]
    resp = await api.post("/api/builds", headers=bearer(owner), json={"manifest": MANIFEST})
    submitted = await resp.json()
    assert resp.status == 201, submitted
    path = submitted["url"].removeprefix("https://ci.example.com")
    pinned = await (await api.patch(path + "/pin", headers=bearer(owner))).json()
    await api.patch(path + "/pin", headers=bearer(owner))  # no change: no event
    unpinned = await (await api.patch(path + "/unpin", headers=bearer(owner))).json()
    resp = await api.post(path + "/tags", headers=bearer(owner), json=["qa", "bad tag!"])
    tags = await resp.json()
    await api.post(path + "/tags", headers=bearer(owner), json=["qa"])  # nothing new: no event
    resp = await api.delete(path, headers=bearer(owner))  # still queued: killed at once
    assert resp.status == 204
    killed = await (await api.get(path, headers=bearer(owner))).json()
    assert killed["status"] == "killed"
    events = await queued(pool)
    assert [(hook_id, event) for hook_id, event, _ in events] == [
        (h, "build.submitted"),
        (h, "build.pinned"),
        (h, "build.unpinned"),
        (h, "build.tagged"),
        (h, "build.finished"),
    ]
    assert events[0][2] == submitted
    assert events[1][2] == pinned and pinned["pinned"] is True
    assert events[2][2] == unpinned
    tagged = events[3][2]
    assert tagged == {
        "build": {**unpinned, "tags": ["qa"]},
        "tags": [{**tags[0], "build": None}],
        "url": submitted["tags_url"],
        "user": user_json(alice),
    }
    assert events[4][2] == killed


async def test_invite_and_namespace_events(
    api: TestClient, owner: str, pool: asyncpg.Pool, token: MakeToken, make_user: MakeUser,
    alice: User,
):  # fmt: skip
    bob, carol = await make_user("bob"), await make_user("carol")
    bob_token, carol_token = await token(ALL, user=bob), await token(ALL, user=carol)
    _, hook = await create(api, owner, payload_url=URL)
    h = hook["id"]
    resp = await api.post(
        "/api/n/alice/team/-/invites", headers=bearer(owner), json={"handle": "bob"}
    )
    to_bob = await resp.json()
    await api.patch(f"/api/invites/{to_bob['id']}", headers=bearer(bob_token))
    resp = await api.post(
        "/api/n/alice/team/-/invites", headers=bearer(owner), json={"handle": "carol"}
    )
    to_carol = await resp.json()
    assert (
        await api.delete(f"/api/invites/{to_carol['id']}", headers=bearer(carol_token))
    ).status == 204
    resp = await api.post(
        "/api/n/alice/team/-/invites", headers=bearer(owner), json={"handle": "carol"}
    )
    again = await resp.json()
    resp = await api.delete(f"/api/invites/{again['id']}", headers=bearer(owner))
    assert resp.status == 204
    child = await create_namespace(api, owner, "sub", parent="team")
    _, child_hook = await create(api, owner, "/api/n/alice/team/sub/-/webhooks", payload_url=URL)
    resp = await api.patch("/api/n/alice/team", headers=bearer(owner), json={"description": "d"})
    team = await resp.json()
    sub = await (await api.get("/api/n/alice/team/sub", headers=bearer(owner))).json()
    assert (await api.delete("/api/n/alice/team/sub", headers=bearer(owner))).status == 204
    ns_json = {k: v for k, v in team.items() if k != "description"}
    events = await queued(pool)
    assert [(hook_id, event) for hook_id, event, _ in events] == [
        (h, "invite.sent"),
        (h, "invite.accepted"),
        (h, "invite.sent"),
        (h, "invite.rejected"),
        (h, "invite.sent"),
        (h, "namespaces"),
        (h, "namespaces"),
        (child_hook["id"], "namespaces"),
    ]
    assert events[0][2] == {
        "invitee": user_json(bob),
        "inviter": user_json(alice),
        "namespace": to_bob["namespace"],
    }
    assert events[1][2] == {"invitee": user_json(bob), "namespace": to_bob["namespace"]}
    assert events[3][2] == {"invitee": user_json(carol), "namespace": to_carol["namespace"]}
    assert events[5][2] == {"action": "created", "namespace": child}
    assert events[6][2] == {"action": "updated", "namespace": team}
    assert ns_json  # the team entity came back
    # The deleted namespace's webhook is gone, its `deleted` event is still queued for it.
    assert events[7][2] == {"action": "deleted", "namespace": sub}
    async with pool.acquire() as conn:
        assert (
            await conn.fetchval("SELECT count(*) FROM webhooks WHERE id = $1", child_hook["id"])
            == 0
        )
