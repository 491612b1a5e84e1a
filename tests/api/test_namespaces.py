"""Namespaces (docs/api.md §8): create, show, update, delete, listings, collaborators, badge."""

from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid.users import User
from tests.api.helpers import BASE, add_collaborator, create_namespace, user_json
from tests.conftest import MakeToken, MakeUser, bearer

LINKS = (
    "builds", "namespaces", "images", "objects", "variables", "keys",
    "invites", "collaborators", "webhooks",
)  # fmt: skip


def expected(ns: dict[str, Any], owner: User, **overrides: Any) -> dict[str, Any]:
    """The whole Namespace entity for a namespace `ns` (its id, created_at) owned by `owner`."""
    path = overrides.get("path", ns["path"])
    url = f"{BASE}/n/{owner.username}/{path}"
    body = {
        "id": ns["id"],
        "user_id": owner.id,
        "root_id": ns["root_id"],
        "parent_id": ns["parent_id"],
        "name": ns["name"],
        "path": path,
        "description": "",
        "visibility": "private",
        "max_running": None,
        "created_at": ns["created_at"],
        "url": url,
        **{f"{link}_url": f"{url}/-/{link}" for link in LINKS},
        "user": user_json(owner),
        "parent": None,
        "build": None,
    }
    body.update(overrides)
    return body


async def test_create_root_namespace(api: TestClient, alice: User, token: MakeToken):
    resp = await api.post(
        "/api/namespaces",
        headers=bearer(await token("namespace:write")),
        json={"name": "acme", "description": "ACME builds", "visibility": "public"},
    )
    assert resp.status == 201
    body = await resp.json()
    assert body["root_id"] == body["id"] and body["parent_id"] is None
    assert body == expected(body, alice, description="ACME builds", visibility="public")


async def test_child_takes_parent_visibility_and_embeds_parent(
    api: TestClient, alice: User, token: MakeToken
):
    value = await token("namespace:read,write")
    root = await create_namespace(api, value, "acme", visibility="internal")
    child = await create_namespace(api, value, "backend", parent="acme", visibility="public")
    assert child == expected(
        child,
        alice,
        path="acme/backend",
        root_id=root["id"],
        parent_id=root["id"],
        visibility="internal",
        parent=root,
    )
    grandchild = await create_namespace(api, value, "api", parent="acme/backend")
    assert grandchild["path"] == "acme/backend/api" and grandchild["root_id"] == root["id"]
    shown = await (await api.get("/api/n/alice/acme/backend/api", headers=bearer(value))).json()
    assert shown["parent"]["path"] == "acme/backend"
    assert shown["parent"]["parent"] is None


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, {"name": ["Name field required"]}),
        ({"name": "ab"}, {"name": ["Name must be between 3 and 32 characters in length"]}),
        ({"name": "a" * 33}, {"name": ["Name must be between 3 and 32 characters in length"]}),
        ({"name": "a-b_c"}, {"name": ["Name can only have letters, and numbers"]}),
        (
            {"name": "a!", "description": "d" * 256, "visibility": "secret"},
            {
                "name": [
                    "Name must be between 3 and 32 characters in length",
                    "Name can only have letters, and numbers",
                ],
                "description": ["Description cannot be longer than 255 characters in length"],
                "visibility": ["Visibility must be one of private, internal, public"],
            },
        ),
        ({"name": "abc", "parent": "nope"}, {"parent": ["Parent does not exist"]}),
        (
            {"name": 3, "parent": True},
            {"name": ["Name must be a string"], "parent": ["Parent must be a string"]},
        ),
    ],
)
async def test_create_namespace_validation(
    api: TestClient, token: MakeToken, pool: asyncpg.Pool, body: dict[str, Any], errors: dict
):
    resp = await api.post(
        "/api/namespaces", headers=bearer(await token("namespace:write")), json=body
    )
    assert resp.status == 400
    assert await resp.json() == errors
    assert await pool.fetchval("SELECT count(*) FROM namespaces") == 0


async def test_duplicate_path_and_depth_limit(api: TestClient, token: MakeToken):
    value = await token("namespace:write")
    parent = ""
    for depth in range(20):
        ns = await create_namespace(
            api, value, f"lvl{depth}", **({"parent": parent} if parent else {})
        )
        parent = ns["path"]
    resp = await api.post(
        "/api/namespaces", headers=bearer(value), json={"name": "deep", "parent": parent}
    )
    assert await resp.json() == {"parent": ["Parent cannot have children beyond a depth of 20"]}
    resp = await api.post("/api/namespaces", headers=bearer(value), json={"name": "lvl0"})
    assert resp.status == 400
    assert await resp.json() == {"name": ["Name already exists"]}


async def test_other_users_may_reuse_a_path(api: TestClient, make_user: MakeUser, token: MakeToken):
    bob = await make_user("bob")
    await create_namespace(api, await token("namespace:write"), "shared")
    ns = await create_namespace(api, await token("namespace:write", user=bob), "shared")
    assert ns["url"] == f"{BASE}/n/bob/shared"


@pytest.mark.parametrize(
    ("visibility", "anonymous", "other"),
    [("private", 404, 404), ("internal", 404, 200), ("public", 200, 200)],
)
async def test_visibility_decides_who_sees(
    api: TestClient,
    make_user: MakeUser,
    token: MakeToken,
    visibility: str,
    anonymous: int,
    other: int,
):
    bob = await make_user("bob")
    await create_namespace(api, await token("namespace:write"), "proj", visibility=visibility)
    assert (await api.get("/api/n/alice/proj")).status == anonymous
    bob_token = await token("namespace:read", user=bob)
    assert (await api.get("/api/n/alice/proj", headers=bearer(bob_token))).status == other
    # Public namespaces waive the read scope; others need it.
    scopeless = await token("build:read", user=bob)
    status = (await api.get("/api/n/alice/proj", headers=bearer(scopeless))).status
    assert status == (200 if visibility == "public" else 404)


async def test_collaborator_sees_private_tree_but_cannot_administer(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken
):
    bob = await make_user("bob")
    owner = await token("namespace:read,write,delete invite:write")
    bob_token = await token("namespace:read,write,delete invite:read,write", user=bob)
    await create_namespace(api, owner, "team")
    await create_namespace(api, owner, "child", parent="team")
    await add_collaborator(api, owner, "team", "alice", bob_token, "bob")
    assert (await api.get("/api/n/alice/team/child", headers=bearer(bob_token))).status == 200
    patch = await api.patch(
        "/api/n/alice/team", headers=bearer(bob_token), json={"description": "x"}
    )
    assert patch.status == 404
    assert (await api.delete("/api/n/alice/team", headers=bearer(bob_token))).status == 404
    assert (
        await api.get("/api/n/alice/team/-/collaborators", headers=bearer(bob_token))
    ).status == 404
    listed = await (await api.get("/api/namespaces", headers=bearer(bob_token))).json()
    assert [ns["path"] for ns in listed] == ["team", "team/child"]


async def test_update_description_and_tree_visibility(
    api: TestClient, alice: User, token: MakeToken
):
    value = await token("namespace:read,write")
    root = await create_namespace(api, value, "acme")
    await create_namespace(api, value, "child", parent="acme")
    resp = await api.patch(
        "/api/n/alice/acme",
        headers=bearer(value),
        json={"description": "new", "visibility": "public"},
    )
    assert resp.status == 200
    assert await resp.json() == expected(root, alice, description="new", visibility="public")
    child = await (await api.get("/api/n/alice/acme/child", headers=bearer(value))).json()
    assert child["visibility"] == "public"
    # A child's visibility is ignored; an empty description leaves it unchanged.
    resp = await api.patch(
        "/api/n/alice/acme/child",
        headers=bearer(value),
        json={"visibility": "private", "description": ""},
    )
    assert (await resp.json())["visibility"] == "public"
    resp = await api.patch(
        "/api/n/alice/acme", headers=bearer(value), json={"visibility": "hidden", "description": 5}
    )
    assert resp.status == 400
    assert await resp.json() == {
        "description": ["Description must be a string"],
        "visibility": ["Visibility must be one of private, internal, public"],
    }


async def test_delete_removes_descendants(api: TestClient, token: MakeToken, pool: asyncpg.Pool):
    value = await token("namespace:read,write,delete")
    await create_namespace(api, value, "acme")
    await create_namespace(api, value, "child", parent="acme")
    await create_namespace(api, value, "other")
    resp = await api.delete("/api/n/alice/acme", headers=bearer(value))
    assert resp.status == 204
    assert await pool.fetchval("SELECT array_agg(path) FROM namespaces") == ["other"]
    assert (await api.get("/api/n/alice/acme/child", headers=bearer(value))).status == 404


async def test_listing_paginates_and_searches(api: TestClient, token: MakeToken):
    value = await token("namespace:read,write")
    for n in range(30):
        await create_namespace(api, value, f"proj{n:02d}")
    await create_namespace(api, value, "zzzOther")
    first = await api.get("/api/namespaces?search=PROJ", headers=bearer(value))
    page = await first.json()
    assert [ns["path"] for ns in page] == [f"proj{n:02d}" for n in range(25)]
    assert all(ns["parent"] is None for ns in page)
    assert first.headers["Link"] == (
        f'<{BASE}/namespaces?page=1&search=PROJ>; rel="prev", '
        f'<{BASE}/namespaces?page=2&search=PROJ>; rel="next"'
    )
    second = await (
        await api.get("/api/namespaces?search=proj&page=2", headers=bearer(value))
    ).json()
    assert [ns["path"] for ns in second] == [f"proj{n:02d}" for n in range(25, 30)]


async def test_children_listing(api: TestClient, make_user: MakeUser, token: MakeToken):
    value = await token("namespace:read,write")
    await create_namespace(api, value, "acme", visibility="public")
    for name in ("web", "api", "data"):
        await create_namespace(api, value, name, parent="acme")
    await create_namespace(api, value, "deep", parent="acme/web")
    resp = await api.get("/api/n/alice/acme/-/namespaces")  # anonymous: public
    assert resp.status == 200
    assert [ns["path"] for ns in await resp.json()] == ["acme/api", "acme/data", "acme/web"]
    resp = await api.get("/api/n/alice/acme/-/namespaces?search=w")
    assert [ns["path"] for ns in await resp.json()] == ["acme/web"]


async def test_collaborators_list_and_remove(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken, pool: asyncpg.Pool
):
    bob, carol = await make_user("bob"), await make_user("carol")
    owner = await token("namespace:read,write,delete invite:write")
    await create_namespace(api, owner, "team")
    await create_namespace(api, owner, "sub", parent="team")
    for user in (bob, carol):
        invitee = await token("invite:write", user=user)
        await add_collaborator(api, owner, "team", "alice", invitee, user.username)
    resp = await api.get("/api/n/alice/team/sub/-/collaborators", headers=bearer(owner))
    rows = await pool.fetch(
        "SELECT u.username, c.created_at"
        " FROM namespace_collaborators c JOIN users u ON u.id = c.user_id"
    )
    joined = {r["username"]: r["created_at"] for r in rows}
    assert await resp.json() == [
        {
            "id": user.id,
            "email": user.email,
            "username": user.username,
            "created_at": joined[user.username].isoformat().replace("+00:00", "Z"),
            "url": f"{BASE}/n/alice/team/sub/-/collaborators/{user.username}",
        }
        for user in (bob, carol)
    ]
    resp = await api.delete(
        "/api/n/alice/team/-/collaborators/carol@example.com", headers=bearer(owner)
    )
    assert resp.status == 204
    resp = await api.delete("/api/n/alice/team/-/collaborators/carol", headers=bearer(owner))
    assert resp.status == 400
    assert await resp.json() == {"message": "No such collaborator"}
    remaining = await (
        await api.get("/api/n/alice/team/-/collaborators", headers=bearer(owner))
    ).json()
    assert [c["username"] for c in remaining] == ["bob"]


async def test_badge_is_always_an_svg(api: TestClient, token: MakeToken):
    await create_namespace(api, await token("namespace:write"), "acme", visibility="public")
    for path in ("/api/n/alice/acme/-/badge.svg", "/api/n/ghost/nope/-/badge.svg"):
        resp = await api.get(path)
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "image/svg+xml"
        assert resp.headers["Cache-Control"] == "no-cache"
        svg = await resp.text()
        assert "<title>marid: unknown</title>" in svg
        assert "#383e51" in svg and "#6a7393" in svg


async def test_paths_beyond_depth_20_and_bad_segments_are_404(api: TestClient, token: MakeToken):
    value = await token("namespace:read")
    for path in ("/api/n/alice/" + "/".join(["a"] * 21), "/api/n/alice/a-b", "/api/n/alice/acme/"):
        assert (await api.get(path, headers=bearer(value))).status == 404
