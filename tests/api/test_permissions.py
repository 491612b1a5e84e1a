"""The permission matrix: for every endpoint, the status each kind of caller gets.

Roles, tried in this order against a private namespace tree `alice/team` (child `team/sub`):
  anonymous     no token
  no_scope      the owner's token holding every scope except the endpoint's
  stranger      carol, a valid user with every scope, neither owner nor collaborator
  collaborator  bob, a collaborator of the tree, every scope
  owner         alice, every scope; the one administrator (server.admins, docs/api.md §28)
Resources named in a path exist twice, one per role that may change them ({x} is replaced by
the collaborator's copy for bob and the owner's copy for everyone else), so a successful
DELETE by one role does not change what the next role sees. Later issues add rows to ROWS.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from marid import remote, scopes, tokens, users
from marid.config import Config
from marid.scheduler import loop
from tests.api.helpers import add_collaborator, create_namespace
from tests.conftest import base_config, bearer

ROLES = ("anonymous", "no_scope", "stranger", "collaborator", "owner")
PRIVATE_KEY = (
    ed25519.Ed25519PrivateKey.generate()
    .private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    .decode()
)


@dataclass(frozen=True)
class Row:
    method: str
    path: str  # "{role}" and resource names ("{variable}") are filled in per role
    scope: str  # the scope(s) the endpoint needs, space separated
    statuses: tuple[int, int, int, int, int]  # in ROLES order
    body: Any = None  # JSON; strings may hold "{role}"
    raw: bytes | None = None  # a raw upload body instead of JSON

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def private(ok: int) -> tuple[int, int, int, int, int]:
    """Owner and collaborators may: the "use" right of docs/api.md §3.2."""
    return (404, 404, 404, ok, ok)


def owner_only(ok: int) -> tuple[int, int, int, int, int]:
    """Only the namespace owner may: the "administer" right of docs/api.md §3.2."""
    return (404, 404, 404, 404, ok)


def created(ok: int = 201) -> tuple[int, int, int, int, int]:
    """Creating in alice's tree: a stranger names a namespace they cannot use, a field error
    (docs/api.md §1.6)."""
    return (404, 404, 400, ok, ok)


def mine(ok: int = 200) -> tuple[int, int, int, int, int]:
    """ "My" listings: every valid user has one."""
    return (404, 404, ok, ok, ok)


N = "/api/n/alice/team"
B = "/api/b/alice/{build}"
TEAM = "team@alice"
QCOW2 = b"QFI\xfb" + bytes(64)
MANIFEST = "driver: {type: docker, image: busybox, workspace: /w}\nnamespace: team@alice\n"
RUNNER = remote.Announcement("remote-1", "1.0", "host", ["docker"], [], 1, [], None, 10.0)
ROWS: list[Row] = [
    Row("GET", "/api/user", "", (404, 200, 200, 200, 200)),
    Row("GET", "/api/namespaces", "namespace:read", (404, 404, 200, 200, 200)),
    Row("POST", "/api/namespaces", "namespace:write", (404, 404, 201, 201, 201), {"name": "fresh"}),
    Row("GET", N, "namespace:read", private(200)),
    Row("GET", N + "/sub", "namespace:read", private(200)),
    Row("PATCH", N, "namespace:write", owner_only(200), {"description": "x"}),
    Row("DELETE", N + "/sub", "namespace:delete", owner_only(204)),
    Row("GET", N + "/-/namespaces", "namespace:read", private(200)),
    Row("GET", N + "/-/collaborators", "namespace:read", owner_only(200)),
    Row("DELETE", N + "/-/collaborators/bob", "namespace:delete", owner_only(204)),
    Row("GET", N + "/-/badge.svg", "", (200, 200, 200, 200, 200)),
    Row("GET", N + "/-/invites", "invite:read", owner_only(200)),
    Row("POST", N + "/-/invites", "invite:write", owner_only(201), {"handle": "erin"}),
    Row("GET", "/api/invites", "invite:read", (404, 404, 200, 200, 200)),
    # The pending invite is dave's: neither owner (its inviter) nor anyone else may accept it;
    # the inviter may withdraw it.
    Row("PATCH", "/api/invites/{invite}", "invite:write", (404, 404, 404, 404, 404)),
    Row("DELETE", "/api/invites/{invite}", "invite:delete", owner_only(204)),
    # Variables (docs/api.md §15)
    Row("GET", "/api/variables", "variable:read", mine()),
    Row("POST", "/api/variables", "variable:write", created(),
        {"key": "K_{role}", "value": "v", "namespace": TEAM}),
    Row("GET", "/api/variables/{variable}", "variable:read", private(200)),
    Row("DELETE", "/api/variables/{variable}", "variable:delete", private(204)),
    Row("GET", N + "/-/variables", "namespace:read", private(200)),
    # SSH keys (§13)
    Row("GET", "/api/keys", "key:read", mine()),
    Row("POST", "/api/keys", "key:write", created(),
        {"name": "k_{role}", "key": "{private_key}", "namespace": TEAM}),
    Row("GET", "/api/keys/{key}", "key:read", private(200)),
    Row("PATCH", "/api/keys/{key}", "key:write", private(200), {"config": "Host x"}),
    Row("DELETE", "/api/keys/{key}", "key:delete", private(204)),
    Row("GET", N + "/-/keys", "namespace:read", private(200)),
    # Objects (§14)
    Row("GET", "/api/objects", "object:read", mine()),
    Row("POST", "/api/objects?name=o_{role}&namespace=" + TEAM, "object:write", created(),
        raw=b"data"),
    Row("GET", "/api/objects/{object}", "object:read", private(200)),
    Row("GET", "/api/objects/{object}/builds", "object:read build:read", private(200)),
    Row("DELETE", "/api/objects/{object}", "object:delete", private(204)),
    Row("GET", N + "/-/objects", "namespace:read", private(200)),
    # Images (§12)
    Row("GET", "/api/images", "image:read", mine()),
    Row("POST", "/api/images?name=i_{role}&namespace=" + TEAM, "image:write", created(),
        raw=QCOW2),
    Row("GET", "/api/images/{image}", "image:read", private(200)),
    Row("DELETE", "/api/images/{image}", "image:delete", private(204)),
    Row("GET", N + "/-/images", "namespace:read", private(200)),
    # Builds (§7, EXT d)
    Row("GET", "/api/builds", "build:read", mine()),
    Row("POST", "/api/builds", "build:write", created(), {"manifest": MANIFEST}),
    Row("GET", N + "/-/builds", "namespace:read", private(200)),
    Row("GET", B, "build:read", private(200)),
    Row("DELETE", B, "build:delete", private(204)),
    Row("PATCH", B + "/pin", "build:write", private(200)),
    Row("PATCH", B + "/unpin", "build:write", private(200)),
    Row("GET", B + "/jobs", "build:read", private(200)),
    Row("GET", B + "/jobs/create-driver", "build:read", private(200)),
    Row("GET", B + "/jobs/create-driver/output", "build:read", private(200)),
    Row("GET", B + "/artifacts", "build:read", private(200)),
    Row("GET", B + "/objects", "build:read", private(200)),
    Row("GET", B + "/variables", "build:read", private(200)),
    Row("GET", B + "/keys", "build:read", private(200)),
    Row("GET", B + "/tags", "build:read", private(200)),
    Row("POST", B + "/tags", "build:write", private(201), ["new"]),
    Row("GET", B + "/tags/first", "build:read", private(200)),
    Row("DELETE", B + "/tags/first", "build:delete", private(204)),
    # Cron (§11, EXT a)
    Row("GET", "/api/cron", "cron:read", mine()),
    Row("POST", "/api/cron", "cron:write", created(), {"name": "c_{role}", "manifest": MANIFEST}),
    Row("GET", "/api/cron/{cron}", "cron:read", private(200)),
    Row("GET", "/api/cron/{cron}/builds", "cron:read build:read", private(200)),
    Row("PATCH", "/api/cron/{cron}", "cron:write", private(200), {"schedule": "weekly"}),
    Row("DELETE", "/api/cron/{cron}", "cron:delete", private(204)),
    # Webhooks (§10): owner and collaborators, whatever the visibility
    Row("GET", N + "/-/webhooks", "webhook:read", private(200)),
    Row("POST", N + "/-/webhooks", "webhook:write", private(201),
        {"payload_url": "https://hooks.example.org/new/{role}"}),
    Row("GET", N + "/-/webhooks/{webhook}", "webhook:read", private(200)),
    Row("GET", N + "/-/webhooks/{webhook}/deliveries", "webhook:read", private(200)),
    Row("PATCH", N + "/-/webhooks/{webhook}", "webhook:write", private(200), {"active": False}),
    Row("DELETE", N + "/-/webhooks/{webhook}", "webhook:delete", private(204)),
    # Runners and runner tokens (§28): administrators only (alice is one, server.admins)
    Row("GET", "/api/runners", "runner:read", owner_only(200)),
    Row("DELETE", "/api/runners/{runner}", "runner:delete", owner_only(204)),
    Row("GET", "/api/runner-tokens", "runner:read", owner_only(200)),
    Row("POST", "/api/runner-tokens", "runner:write", owner_only(201), {"name": "t_{role}"}),
    Row("DELETE", "/api/runner-tokens/{enrolment}", "runner:delete", owner_only(204)),
]  # fmt: skip


@dataclass
class World:
    tokens: dict[str, str | None] = field(default_factory=dict)
    ids: dict[str, dict[str, int]] = field(default_factory=dict)
    owner: users.User | None = None

    def fill(self, text: str, role: str) -> str:
        copy = "collaborator" if role == "collaborator" else "owner"
        values = {name: str(ids[copy]) for name, ids in self.ids.items()}
        values.update(role=role, private_key=PRIVATE_KEY)
        for name, value in values.items():
            text = text.replace("{" + name + "}", value)
        return text

    def body(self, row: Row, role: str) -> Any:
        if isinstance(row.body, dict):
            return {k: self.fill(v, role) if isinstance(v, str) else v for k, v in row.body.items()}
        return row.body


@pytest.fixture
def config(db_dsn: str, tmp_path: Path) -> Config:
    """alice administers runners (server.admins, docs/api.md §28); nobody else does."""
    cfg = base_config(db_dsn, tmp_path)
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, admins=["alice"]))


@pytest.fixture
async def world(api: TestClient, pool: asyncpg.Pool) -> World:
    async with pool.acquire() as conn:
        people = {
            name: await users.create(conn, name, f"{name}@example.com", "password1")
            for name in ("alice", "bob", "carol", "dave", "erin")
        }
        full = {
            name: (await tokens.create(conn, people[name], "full", scopes.FULL))[1]
            for name in ("alice", "bob", "carol", "dave")
        }
    w = World(owner=people["alice"])
    w.tokens = {"anonymous": None, "stranger": full["carol"], "collaborator": full["bob"],
                "owner": full["alice"]}  # fmt: skip
    await create_namespace(api, full["alice"], "team")
    await create_namespace(api, full["alice"], "sub", parent="team")
    await add_collaborator(api, full["alice"], "team", "alice", full["bob"], "bob")
    resp = await api.post(f"{N}/-/invites", headers=bearer(full["alice"]), json={"handle": "dave"})
    invite = (await resp.json())["id"]
    w.ids["invite"] = {"owner": invite, "collaborator": invite}
    for role, name in (("owner", "alice"), ("collaborator", "bob")):
        await make_resources(api, w, role, full[name])
    async with pool.acquire() as conn:  # only alice may act on these: one of each
        enrolment, _ = await remote.create_enrolment(conn, "hosts", None, None)
        runner, _ = await remote.register(conn, enrolment.id, RUNNER, None, 3)
    w.ids["enrolment"] = dict.fromkeys(("owner", "collaborator"), enrolment.id)
    w.ids["runner"] = dict.fromkeys(("owner", "collaborator"), runner.id)
    return w


async def created_id(
    api: TestClient, token: str, path: str, field: str = "id", **kwargs: Any
) -> Any:
    resp = await api.post(path, headers=bearer(token), **kwargs)
    assert resp.status == 201, await resp.text()
    return (await resp.json())[field]


async def make_resources(api: TestClient, w: World, role: str, token: str) -> None:
    """One of each resource in alice's tree, made by `role` (their copy to act on)."""
    ids = {
        "variable": await created_id(
            api, token, "/api/variables", json={"key": f"V_{role}", "value": "v", "namespace": TEAM}
        ),
        "key": await created_id(
            api,
            token,
            "/api/keys",
            json={"name": f"key_{role}", "key": PRIVATE_KEY, "namespace": TEAM},
        ),
        "object": await created_id(
            api, token, f"/api/objects?name=obj_{role}&namespace={TEAM}", data=b"x"
        ),
        "image": await created_id(
            api, token, f"/api/images?name=img_{role}&namespace={TEAM}", data=QCOW2
        ),
        "build": await created_id(
            api, token, "/api/builds", "number", json={"manifest": MANIFEST, "tags": ["first"]}
        ),
        "cron": await created_id(
            api, token, "/api/cron", json={"name": f"cron_{role}", "manifest": MANIFEST}
        ),
        "webhook": await created_id(
            api, token, N + "/-/webhooks", json={"payload_url": f"https://h.example.org/{role}"}
        ),
    }
    for name, value in ids.items():
        w.ids.setdefault(name, {})[role] = value


async def token_without(pool: asyncpg.Pool, owner: users.User, needed: str) -> str:
    lacking = scopes.Scope(scopes.FULL.grants - scopes.parse(needed).grants)
    async with pool.acquire() as conn:
        _, value = await tokens.create(conn, owner, "lacking", lacking)
    return value


@pytest.mark.parametrize("row", ROWS, ids=str)
async def test_permission_matrix(api: TestClient, pool: asyncpg.Pool, world: World, row: Row):
    assert world.owner is not None
    world.tokens["no_scope"] = (
        await token_without(pool, world.owner, row.scope) if row.scope else world.tokens["owner"]
    )
    got = []
    for role in ROLES:
        value = world.tokens[role]
        headers = bearer(value) if value else {}
        path = world.fill(row.path, role)
        if row.raw is not None:
            resp = await api.request(row.method, path, headers=headers, data=row.raw)
        else:
            resp = await api.request(row.method, path, headers=headers, json=world.body(row, role))
        got.append(resp.status)
    assert dict(zip(ROLES, got, strict=True)) == dict(zip(ROLES, row.statuses, strict=True))


# Listings across moves and visibility changes (issue 11 row 3): a listing shows each item only
# to those who could read that item on its own (docs/api.md §3.2, §7.2), whatever the listing's
# subject (a cron job) has become since.
READERS = ("anonymous", "no_build_read", "stranger", "collaborator", "owner")


async def fire(pool: asyncpg.Pool, config: Config, cron_id: int) -> str:
    """Run the cron job now through the scheduler; returns the build it made as
    `owner/number`."""
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE crons SET next_run = now() - interval '1 minute' WHERE id = $1", cron_id
        )
    assert await loop.tick(pool, datetime.now(UTC), 10, config) == 1
    async with pool.acquire() as conn:
        made = await conn.fetchval(
            "SELECT u.username || '/' || b.number FROM builds b JOIN users u ON u.id = b.user_id"
            " WHERE b.cron_id = $1 ORDER BY b.id DESC LIMIT 1",
            cron_id,
        )
    return str(made)


async def move_cron(api: TestClient, token: str, cron_id: int, namespace: str | None) -> None:
    manifest = (
        MANIFEST.replace("team@alice", namespace)
        if namespace
        else MANIFEST.replace("namespace: team@alice\n", "")
    )
    resp = await api.patch(
        f"/api/cron/{cron_id}", headers=bearer(token), json={"manifest": manifest}
    )
    assert resp.status == 200, await resp.text()


async def readers(pool: asyncpg.Pool, world: World) -> dict[str, str | None]:
    assert world.owner is not None
    return {
        **world.tokens,
        "no_build_read": await token_without(pool, world.owner, "build:read"),
    }


async def seen(api: TestClient, path: str, tokens: dict[str, str | None]) -> dict[str, Any]:
    """Per reader: the builds (`owner/number`) the listing at `path` shows, or the status when
    it is not 200."""
    got: dict[str, Any] = {}
    for role in READERS:
        value = tokens[role]
        resp = await api.get(path, headers=bearer(value) if value else {})
        if resp.status != 200:
            got[role] = resp.status
            continue
        got[role] = sorted(build["url"].split("/b/")[1] for build in await resp.json())
    return got


async def test_a_cron_moved_to_a_public_namespace_keeps_its_earlier_builds_hidden(
    api: TestClient, pool: asyncpg.Pool, config: Config, world: World
):
    """The cron job was in the private `team` (bob collaborates), then alice's personal cron
    job, then in the public `open`: anonymous callers and strangers see only the build made in
    `open`; bob sees `team`'s too, never alice's personal one."""
    alice = world.tokens["owner"]
    assert alice is not None
    await create_namespace(api, alice, "open", visibility="public")
    cron = world.ids["cron"]["owner"]
    in_team = await fire(pool, config, cron)
    await move_cron(api, alice, cron, None)
    personal = await fire(pool, config, cron)
    await move_cron(api, alice, cron, "open")
    in_open = await fire(pool, config, cron)
    assert await seen(api, f"/api/cron/{cron}/builds", await readers(pool, world)) == {
        "anonymous": [in_open],
        "no_build_read": [in_open],
        "stranger": [in_open],
        "collaborator": sorted([in_team, in_open]),
        "owner": sorted([in_team, personal, in_open]),
    }
    for number in (in_team, personal):  # each hidden build is hidden on its own, too
        resp = await api.get(f"/api/b/{number}")
        assert resp.status == 404


async def test_a_collaborators_personal_cron_builds_stay_his_after_a_move_into_a_namespace(
    api: TestClient, pool: asyncpg.Pool, config: Config, world: World
):
    """bob moves his personal cron job into alice's public `open`: the namespace's owner,
    strangers and anonymous callers see the cron job and its new builds, not bob's personal
    ones."""
    alice, bob = world.tokens["owner"], world.tokens["collaborator"]
    assert alice is not None and bob is not None
    await create_namespace(api, alice, "open", visibility="public")
    await add_collaborator_to(api, alice, "open", bob)
    cron = world.ids["cron"]["collaborator"]
    await move_cron(api, bob, cron, None)
    personal = await fire(pool, config, cron)
    await move_cron(api, bob, cron, "open@alice")
    in_open = await fire(pool, config, cron)
    assert await seen(api, f"/api/cron/{cron}/builds", await readers(pool, world)) == {
        "anonymous": [in_open],
        "no_build_read": [in_open],
        "stranger": [in_open],
        "collaborator": sorted([in_open, personal]),
        "owner": [in_open],
    }


async def add_collaborator_to(api: TestClient, owner: str, path: str, invitee: str) -> None:
    resp = await api.post(f"/api/n/alice/{path}/-/invites", headers=bearer(owner),
                          json={"handle": "bob"})  # fmt: skip
    assert resp.status == 201, await resp.text()
    invite = (await resp.json())["id"]
    resp = await api.patch(f"/api/invites/{invite}", headers=bearer(invitee))
    assert resp.status == 200, await resp.text()


async def test_builds_of_a_namespace_made_private_or_deleted_leave_a_public_crons_listing(
    api: TestClient, pool: asyncpg.Pool, config: Config, world: World
):
    """The cron job ran in the public `old`, then moved to the public `open`; `old` is made
    private, then deleted (its builds become alice's own, docs/api.md §8.6): each change
    hides its builds from everyone who can no longer read them."""
    alice = world.tokens["owner"]
    assert alice is not None
    await create_namespace(api, alice, "open", visibility="public")
    await create_namespace(api, alice, "old", visibility="public")
    await add_collaborator_to(api, alice, "old", world.tokens["collaborator"] or "")
    cron = world.ids["cron"]["owner"]
    await move_cron(api, alice, cron, "old")
    in_old = await fire(pool, config, cron)
    await move_cron(api, alice, cron, "open")
    in_open = await fire(pool, config, cron)
    tokens = await readers(pool, world)
    path = f"/api/cron/{cron}/builds"
    assert await seen(api, path, tokens) == dict.fromkeys(READERS, sorted([in_old, in_open]))
    resp = await api.patch(
        "/api/n/alice/old", headers=bearer(alice), json={"visibility": "private"}
    )
    assert resp.status == 200, await resp.text()
    everyone_else = {key: [in_open] for key in ("anonymous", "no_build_read", "stranger")}
    members = dict.fromkeys(("collaborator", "owner"), sorted([in_old, in_open]))
    assert await seen(api, path, tokens) == {**everyone_else, **members}
    resp = await api.delete("/api/n/alice/old", headers=bearer(alice))
    assert resp.status == 204, await resp.text()
    assert await seen(api, path, tokens) == {
        **everyone_else,
        "collaborator": [in_open],
        "owner": sorted([in_old, in_open]),
    }


async def test_listings_follow_a_namespace_made_public_then_private_and_a_removed_collaborator(
    api: TestClient, pool: asyncpg.Pool, world: World
):
    """Every listing of `team`'s crons, objects and builds opens to everyone while `team` is
    public and closes again with it; bob loses them all when he stops collaborating."""
    alice = world.tokens["owner"]
    assert alice is not None
    cron, obj = world.ids["cron"]["owner"], world.ids["object"]["owner"]
    listings = (f"{N}/-/builds", f"{N}/-/objects", f"/api/cron/{cron}/builds",
                f"/api/objects/{obj}/builds")  # fmt: skip
    tokens = await readers(pool, world)

    async def statuses(role: str) -> list[int]:
        value = tokens[role]
        return [(await api.get(path, headers=bearer(value) if value else {})).status
                for path in listings]  # fmt: skip

    async def visibility(value: str) -> None:
        resp = await api.patch(N, headers=bearer(alice), json={"visibility": value})
        assert resp.status == 200, await resp.text()

    await visibility("public")
    for role in READERS:
        assert await statuses(role) == [200] * 4, role
    await visibility("private")
    for role in ("anonymous", "stranger"):
        assert await statuses(role) == [404] * 4, role
    resp = await api.delete(f"{N}/-/collaborators/bob", headers=bearer(alice))
    assert resp.status == 204, await resp.text()
    assert await statuses("collaborator") == [404] * 4
    bob = bearer(world.tokens["collaborator"] or "")
    for mine_path in ("/api/builds", "/api/cron", "/api/objects"):
        resp = await api.get(mine_path, headers=bob)
        assert await resp.json() == [], mine_path


# Cron jobs run with their author's rights (issue 11 row 2, docs/api.md §11.3): only the author
# changes one; its author or the namespace owner deletes it.


async def cron_request(
    api: TestClient, method: str, token: str | None, cron_id: int, body: Any = None
) -> int:
    resp = await api.request(method, f"/api/cron/{cron_id}", headers=bearer(token or ""),
                             json=body)  # fmt: skip
    return resp.status


async def test_only_its_author_changes_a_cron_job_and_the_namespace_owner_may_delete_it(
    api: TestClient, pool: asyncpg.Pool, world: World
):
    alice, bob = world.tokens["owner"], world.tokens["collaborator"]
    alices, bobs = world.ids["cron"]["owner"], world.ids["cron"]["collaborator"]
    takeover = {"manifest": MANIFEST.replace("namespace: team@alice\n", ""), "name": "mine"}
    before = await pool.fetchrow("SELECT * FROM crons WHERE id = $1", alices)
    # bob can read alice's cron job, not change or delete it
    assert await cron_request(api, "GET", bob, alices) == 200
    assert await cron_request(api, "PATCH", bob, alices, takeover) == 404
    assert await cron_request(api, "PATCH", bob, alices, {"schedule": "weekly"}) == 404
    assert await cron_request(api, "DELETE", bob, alices) == 404
    assert await pool.fetchrow("SELECT * FROM crons WHERE id = $1", alices) == before
    # alice owns the namespace: she may delete bob's cron job, not put her words in it
    assert await cron_request(api, "PATCH", alice, bobs, takeover) == 404
    assert await cron_request(api, "DELETE", alice, bobs) == 204
    # each author still changes their own
    assert await cron_request(api, "PATCH", alice, alices, {"schedule": "weekly"}) == 200


async def test_a_removed_collaborators_cron_job_stops_firing_and_never_gets_personal_secrets(
    api: TestClient, pool: asyncpg.Pool, config: Config, world: World
):
    """bob's cron job in alice's `team` makes builds with namespace resources only (alice's
    personal variable never reaches bob's commands); once bob is removed it makes none."""
    alice, bob = world.tokens["owner"], world.tokens["collaborator"]
    assert alice is not None
    secret = {"key": "ALICE_ONLY", "value": "s3cret", "masked": True}
    resp = await api.post("/api/variables", headers=bearer(alice), json=secret)
    assert resp.status == 201, await resp.text()
    cron = world.ids["cron"]["collaborator"]
    made = await fire(pool, config, cron)
    keys = await pool.fetch(
        "SELECT v.key FROM build_variables v JOIN builds b ON b.id = v.build_id"
        " JOIN users u ON u.id = b.user_id WHERE u.username || '/' || b.number = $1",
        made,
    )
    assert "ALICE_ONLY" not in {row["key"] for row in keys}
    assert {"V_owner", "V_collaborator"} <= {row["key"] for row in keys}
    resp = await api.delete(f"{N}/-/collaborators/bob", headers=bearer(alice))
    assert resp.status == 204, await resp.text()
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE crons SET next_run = now() - interval '1 minute' WHERE id = $1", cron
        )
    assert await loop.tick(pool, datetime.now(UTC), 10, config) == 1  # fired, made nothing
    assert await pool.fetchval("SELECT count(*) FROM builds WHERE cron_id = $1", cron) == 1
    assert await cron_request(api, "PATCH", bob, cron, {"schedule": "weekly"}) == 404
    assert await cron_request(api, "DELETE", alice, cron) == 204


async def test_deleting_a_namespace_never_hands_a_collaborators_secrets_to_the_owner(
    api: TestClient, pool: asyncpg.Pool, world: World
):
    """Issue 11 row 14: bob's variable and key in alice's `team` are deleted with it, not
    detached into alice's personal ones; his object stays detached but no build of alice's
    uses it. alice's own are detached as before (docs/api.md §8.6)."""
    alice = world.tokens["owner"]
    assert alice is not None
    resp = await api.delete(N, headers=bearer(alice))
    assert resp.status == 204, await resp.text()
    assert await pool.fetchval("SELECT array_agg(key ORDER BY key) FROM variables") == ["V_owner"]
    assert await pool.fetchval("SELECT array_agg(name ORDER BY name) FROM ssh_keys") == [
        "key_owner"
    ]
    listed = await api.get("/api/variables", headers=bearer(alice))
    assert [v["key"] for v in await listed.json()] == ["V_owner"]
    manifest = (
        "driver: {type: docker, image: busybox, workspace: /w}\n"
        "objects: [obj_owner, obj_collaborator]\n"
    )
    resp = await api.post("/api/builds", headers=bearer(alice), json={"manifest": manifest})
    assert resp.status == 201, await resp.text()
    build = (await resp.json())["id"]
    placed = await pool.fetch(
        "SELECT source, object_id FROM build_objects WHERE build_id = $1 ORDER BY source", build
    )
    assert [(row["source"], row["object_id"] is not None) for row in placed] == [
        ("obj_collaborator", False),
        ("obj_owner", True),
    ]
    frozen = await pool.fetch("SELECT key FROM build_variables WHERE build_id = $1", build)
    assert [row["key"] for row in frozen] == ["V_owner"]


async def test_a_removed_collaborator_lists_nothing_of_the_namespace_not_even_his_own(
    api: TestClient, world: World
):
    """The "my" listings (docs/api.md §3.3) follow access, not authorship: once bob is removed
    from `team`, none of its crons, objects, images, variables, keys or builds is his to list,
    those he wrote included, and a public namespace's stay out of them too."""
    alice, bob = world.tokens["owner"], world.tokens["collaborator"]
    assert alice is not None and bob is not None
    listings = ("cron", "objects", "images", "variables", "keys", "builds")

    async def listed(token: str) -> dict[str, int]:
        counts = {}
        for name in listings:
            resp = await api.get(f"/api/{name}", headers=bearer(token))
            assert resp.status == 200, await resp.text()
            counts[name] = len(await resp.json())
        return counts

    assert await listed(bob) == dict.fromkeys(listings, 2)  # his copy and alice's
    resp = await api.delete(f"{N}/-/collaborators/bob", headers=bearer(alice))
    assert resp.status == 204, await resp.text()
    assert await listed(bob) == dict.fromkeys(listings, 0)
    resp = await api.patch(N, headers=bearer(alice), json={"visibility": "public"})
    assert resp.status == 200, await resp.text()
    assert await listed(bob) == dict.fromkeys(listings, 0)
    assert await listed(alice) == dict.fromkeys(listings, 2)
