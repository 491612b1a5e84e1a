"""The permission matrix: for every endpoint, the status each kind of caller gets.

Roles, tried in this order against a private namespace tree `alice/team` (child `team/sub`):
  anonymous     no token
  no_scope      the owner's token holding every scope except the endpoint's
  stranger      carol, a valid user with every scope, neither owner nor collaborator
  collaborator  bob, a collaborator of the tree, every scope
  owner         alice, every scope
Resources named in a path exist twice, one per role that may change them ({x} is replaced by
the collaborator's copy for bob and the owner's copy for everyone else), so a successful
DELETE by one role does not change what the next role sees. Later issues add rows to ROWS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import scopes, tokens, users
from tests.api.helpers import add_collaborator, create_namespace
from tests.conftest import bearer

ROLES = ("anonymous", "no_scope", "stranger", "collaborator", "owner")


@dataclass(frozen=True)
class Row:
    method: str
    path: str
    scope: str  # the scope(s) the endpoint needs, space separated
    statuses: tuple[int, int, int, int, int]  # in ROLES order
    body: Any = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def private(ok: int) -> tuple[int, int, int, int, int]:
    """Owner and collaborators may: the "use" right of API.md §3.2."""
    return (404, 404, 404, ok, ok)


def owner_only(ok: int) -> tuple[int, int, int, int, int]:
    """Only the namespace owner may: the "administer" right of API.md §3.2."""
    return (404, 404, 404, 404, ok)


N = "/api/n/alice/team"
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
]


@dataclass
class World:
    tokens: dict[str, str | None] = field(default_factory=dict)
    ids: dict[str, dict[str, int]] = field(default_factory=dict)
    owner: users.User | None = None

    def path(self, row: Row, role: str) -> str:
        copy = "collaborator" if role == "collaborator" else "owner"
        return row.path.format(**{name: ids[copy] for name, ids in self.ids.items()})


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
    return w


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
        resp = await api.request(row.method, world.path(row, role), headers=headers, json=row.body)
        got.append(resp.status)
    assert dict(zip(ROLES, got, strict=True)) == dict(zip(ROLES, row.statuses, strict=True))
