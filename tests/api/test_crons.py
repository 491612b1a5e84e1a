"""Cron jobs through the API (docs/api.md §11, docs/api.md §17), with an injected clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import channels, crons
from marid import config as config_module
from marid.users import User
from tests.api.helpers import BASE, add_collaborator, create_namespace, user_json
from tests.conftest import MakeToken, MakeUser, bearer

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)  # EXT a.3: a Friday
MANIFEST = "driver: {type: docker, image: busybox, workspace: /w}\n"
QEMU = "driver: {type: qemu, image: debian.qcow2}\n"  # not enabled: accepted for a cron (§11.5)
ALL = "cron:read,write,delete build:read namespace:read,write invite:read,write"
INVALID = "Schedule must be daily, weekly, monthly or a 5-field cron expression"


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crons, "now", lambda: NOW)


async def post(api: TestClient, token: str, **fields: Any) -> tuple[int, Any]:
    resp = await api.post("/api/cron", headers=bearer(token), json=fields)
    return resp.status, await resp.json()


async def test_create_cron_returns_the_whole_entity(api: TestClient, token: MakeToken, alice: User):
    status, body = await post(api, await token("cron:write"), name="nightly", manifest=MANIFEST)
    assert status == 201, body
    assert body == {
        "id": body["id"],
        "author_id": alice.id,
        "user_id": alice.id,
        "namespace_id": None,
        "name": "nightly",
        "schedule": "daily",
        "manifest": MANIFEST,
        "prev_run": None,
        "next_run": "2024-03-02T00:00:00Z",
        "created_at": body["created_at"],
        "url": f"{BASE}/cron/{body['id']}",
        "author": user_json(alice),
        "user": user_json(alice),
        "namespace": None,
        "timezone": "UTC",
    }
    resp = await api.get(f"/api/cron/{body['id']}", headers=bearer(await token("cron:read")))
    assert await resp.json() == body


@pytest.mark.parametrize(
    ("schedule", "timezone", "expected"),
    [
        ("daily", "UTC", "2024-03-02T00:00:00Z"),
        ("weekly", "UTC", "2024-03-04T00:00:00Z"),
        ("monthly", "UTC", "2024-04-01T00:00:00Z"),
        ("30 2 * * 1-5", "UTC", "2024-03-04T02:30:00Z"),
        ("daily", "Europe/Berlin", "2024-03-01T23:00:00Z"),
        ("0 9 1 * *", "America/New_York", "2024-03-01T14:00:00Z"),
    ],
)
async def test_next_run_follows_the_examples_table(
    api: TestClient, token: MakeToken, schedule: str, timezone: str, expected: str
):
    status, body = await post(
        api, await token("cron:write"), name="c", manifest=MANIFEST, schedule=schedule,
        timezone=timezone,
    )  # fmt: skip
    assert status == 201, body
    assert (body["schedule"], body["timezone"], body["next_run"]) == (schedule, timezone, expected)


async def test_schedule_is_stored_normalised_and_empty_timezone_is_utc(
    api: TestClient, token: MakeToken
):
    status, body = await post(
        api, await token("cron:write"), name="c", manifest=QEMU, schedule="  30  2 *\t* 1-5 ",
        timezone="",
    )  # fmt: skip
    assert status == 201, body
    assert (body["schedule"], body["timezone"]) == ("30 2 * * 1-5", "UTC")


async def test_missing_fields_are_field_errors(api: TestClient, token: MakeToken):
    status, body = await post(api, await token("cron:write"))
    assert (status, body) == (
        400,
        {"name": ["Name field required"], "manifest": ["Manifest field required"]},
    )


@pytest.mark.parametrize(
    ("schedule", "timezone", "errors"),
    [
        ("@daily", "UTC", {"schedule": [INVALID]}),
        ("0 0 * * * 2024", "UTC", {"schedule": [INVALID]}),
        ("0 0 L * *", "UTC", {"schedule": [INVALID]}),
        ("0 0 31 2 *", "UTC", {"schedule": ["Schedule has no upcoming run"]}),
        ("daily", "europe/berlin", {"timezone": ["Timezone unknown time zone europe/berlin"]}),
        ("daily", "Mars/Olympus", {"timezone": ["Timezone unknown time zone Mars/Olympus"]}),
    ],
)
async def test_invalid_schedule_or_timezone(
    api: TestClient, token: MakeToken, schedule: str, timezone: str, errors: dict[str, list[str]]
):
    status, body = await post(
        api, await token("cron:write"), name="c", manifest=MANIFEST, schedule=schedule,
        timezone=timezone,
    )  # fmt: skip
    assert (status, body) == (400, errors)


async def test_name_is_unique_per_owner_and_per_namespace(api: TestClient, token: MakeToken):
    value = await token(ALL)
    assert (await post(api, value, name="c", manifest=MANIFEST))[0] == 201
    assert await post(api, value, name="c", manifest=MANIFEST) == (
        400,
        {"name": ["Name already exists"]},
    )
    await create_namespace(api, value, "team")
    in_team = MANIFEST + "namespace: team\n"
    assert (await post(api, value, name="c", manifest=in_team))[0] == 201
    assert await post(api, value, name="c", manifest=in_team) == (
        400,
        {"name": ["Name already exists"]},
    )


async def test_a_bad_manifest_is_a_manifest_error(api: TestClient, token: MakeToken):
    status, body = await post(api, await token("cron:write"), name="c", manifest="driver: 1\n")
    assert status == 400
    assert list(body) == ["manifest"]


async def test_patch_changes_given_fields_and_recomputes_next_run(
    api: TestClient, token: MakeToken, monkeypatch: pytest.MonkeyPatch
):
    value = await token(ALL)
    _, cron = await post(api, value, name="c", manifest=MANIFEST)
    later = datetime(2024, 3, 5, 12, tzinfo=UTC)
    monkeypatch.setattr(crons, "now", lambda: later)
    url = f"/api/cron/{cron['id']}"
    resp = await api.patch(url, headers=bearer(value), json={"name": "", "manifest": ""})
    assert await resp.json() == cron  # nothing changed, next_run kept
    resp = await api.patch(url, headers=bearer(value), json={"timezone": "Europe/Berlin"})
    body = await resp.json()
    assert resp.status == 200
    assert body == {**cron, "timezone": "Europe/Berlin", "next_run": "2024-03-05T23:00:00Z"}
    resp = await api.patch(
        url, headers=bearer(value), json={"schedule": "weekly", "name": "renamed"}
    )
    body = await resp.json()
    assert (body["name"], body["schedule"], body["next_run"]) == (
        "renamed",
        "weekly",
        "2024-03-10T23:00:00Z",
    )
    resp = await api.patch(url, headers=bearer(value), json={"schedule": "0 0 30 2 *"})
    assert (resp.status, await resp.json()) == (
        400,
        {"schedule": ["Schedule has no upcoming run"]},
    )


# What Djinn's Go client (integration/djinn/cron.go, Cron.Update) sends for
# `c.Update(cli, CronParams{Schedule: Monthly})`: the zero Manifest marshalled by yaml.v2.
DJINN_EMPTY_MANIFEST = (
    'namespace: ""\ndriver: {}\nenv: []\nobjects: []\nsources: []\nstages: []\n'
    "allow_failures: []\njobs: []\n"
)


@pytest.mark.parametrize(
    "change",
    [
        {"name": "", "schedule": "monthly", "manifest": DJINN_EMPTY_MANIFEST},
        {"schedule": "monthly"},
        {"schedule": "monthly", "manifest": None},
        {"schedule": "monthly", "manifest": "{}\n"},
        {"schedule": "monthly", "manifest": "# nothing\n"},
    ],
)
async def test_patch_with_an_empty_manifest_leaves_it_unchanged(
    api: TestClient, token: MakeToken, change: dict[str, Any]
):
    value = await token(ALL)
    _, cron = await post(api, value, name="c", manifest=MANIFEST)
    resp = await api.patch(f"/api/cron/{cron['id']}", headers=bearer(value), json=change)
    body = await resp.json()
    assert resp.status == 200, body
    assert body == {**cron, "schedule": "monthly", "next_run": "2024-04-01T00:00:00Z"}
    # One value that is not empty makes it a manifest, checked as any other.
    manifest = DJINN_EMPTY_MANIFEST.replace("stages: []", "stages: [a]")
    resp = await api.patch(
        f"/api/cron/{cron['id']}", headers=bearer(value), json={"manifest": manifest}
    )
    assert resp.status == 400
    assert list(await resp.json()) == ["manifest"]


async def test_writes_that_set_next_run_notify_the_schedulers_with_it(
    api: TestClient, token: MakeToken, config: config_module.Config
):
    """docs/architecture.md: the scheduler LISTENs so that a new or moved next_run fires on time;
    a change that leaves next_run alone (a rename, a move to a namespace) wakes nobody."""
    got: asyncio.Queue[str] = asyncio.Queue()
    listening = await asyncpg.connect(config.database.dsn)
    try:
        await listening.add_listener(channels.CRONS, lambda *args: got.put_nowait(args[3]))
        value = await token(ALL)
        _, cron = await post(api, value, name="c", manifest=MANIFEST)
        assert (await post(api, value, name="c", manifest=MANIFEST))[0] == 400  # name taken
        await create_namespace(api, value, "team")
        url = f"/api/cron/{cron['id']}"
        statuses = []
        for change in (
            {"name": "renamed"},
            {"manifest": MANIFEST + "namespace: team\n"},
            {"schedule": "weekly"},
            {"timezone": "Europe/Berlin"},
        ):
            resp = await api.patch(url, headers=bearer(value), json=change)
            statuses.append(resp.status)
        assert statuses == [200] * 4
        await listening.execute("SELECT pg_notify($1, 'end')", channels.CRONS)
        async with asyncio.timeout(30):
            payloads = [await got.get() for _ in range(4)]  # in commit order
    finally:
        await listening.close()
    assert payloads == [
        "2024-03-02T00:00:00+00:00",  # created
        "2024-03-04T00:00:00+00:00",  # weekly: Monday
        "2024-03-03T23:00:00+00:00",  # Monday in Berlin
        "end",
    ]


async def test_patch_name_uniqueness_ignores_the_cron_itself(api: TestClient, token: MakeToken):
    value = await token(ALL)
    _, first = await post(api, value, name="a", manifest=MANIFEST)
    await post(api, value, name="b", manifest=MANIFEST)
    url = f"/api/cron/{first['id']}"
    resp = await api.patch(url, headers=bearer(value), json={"name": "a"})
    assert resp.status == 200
    resp = await api.patch(url, headers=bearer(value), json={"name": "b"})
    assert (resp.status, await resp.json()) == (400, {"name": ["Name already exists"]})


async def test_patch_moves_the_cron_into_the_manifest_namespace(
    api: TestClient, token: MakeToken, make_user: MakeUser, alice: User
):
    bob = await make_user("bob")
    alice_token, bob_token = await token(ALL), await token(ALL, user=bob)
    await create_namespace(api, alice_token, "team")
    await add_collaborator(api, alice_token, "team", "alice", bob_token, "bob")
    _, cron = await post(api, bob_token, name="c", manifest=MANIFEST)
    assert cron["user_id"] == bob.id
    resp = await api.patch(
        f"/api/cron/{cron['id']}",
        headers=bearer(bob_token),
        json={"manifest": MANIFEST + "namespace: team@alice\n"},
    )
    body = await resp.json()
    assert (body["user_id"], body["author_id"], body["namespace"]["path"]) == (
        alice.id,
        bob.id,
        "team",
    )
    # Alice, the namespace owner, now sees it and may delete it.
    resp = await api.get("/api/cron", headers=bearer(alice_token))
    assert [c["id"] for c in await resp.json()] == [cron["id"]]


async def test_list_is_by_name_with_search(api: TestClient, token: MakeToken):
    value = await token(ALL)
    for name in ("zeta nightly", "alpha", "Nightly build"):
        await post(api, value, name=name, manifest=MANIFEST)
    resp = await api.get("/api/cron", headers=bearer(value))
    assert [c["name"] for c in await resp.json()] == ["Nightly build", "alpha", "zeta nightly"]
    resp = await api.get("/api/cron?search=NIGHT", headers=bearer(value))
    assert [c["name"] for c in await resp.json()] == ["Nightly build", "zeta nightly"]


async def test_other_users_crons_are_not_found(
    api: TestClient, token: MakeToken, make_user: MakeUser
):
    _, cron = await post(api, await token(ALL), name="c", manifest=MANIFEST)
    carol = await make_user("carol")
    carol_token = await token(ALL, user=carol)
    url = f"/api/cron/{cron['id']}"
    for method in ("GET", "PATCH", "DELETE"):
        resp = await api.request(method, url, headers=bearer(carol_token), json={})
        assert resp.status == 404
    resp = await api.get("/api/cron", headers=bearer(carol_token))
    assert await resp.json() == []


async def test_delete_removes_the_cron(api: TestClient, token: MakeToken):
    value = await token(ALL)
    _, cron = await post(api, value, name="c", manifest=MANIFEST)
    url = f"/api/cron/{cron['id']}"
    assert (await api.delete(url, headers=bearer(value))).status == 204
    assert (await api.get(url, headers=bearer(value))).status == 404


async def test_deleting_the_namespace_deletes_its_crons(api: TestClient, token: MakeToken):
    value = await token(ALL + " namespace:delete")
    await create_namespace(api, value, "team")
    _, cron = await post(api, value, name="c", manifest=MANIFEST + "namespace: team\n")
    assert (await api.delete("/api/n/alice/team", headers=bearer(value))).status == 204
    assert (await api.get(f"/api/cron/{cron['id']}", headers=bearer(value))).status == 404
