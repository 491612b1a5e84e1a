"""Variables (docs/api.md §15, §8.8): masked values are sealed at rest and never shown."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import variables
from marid.crypto import Cipher, DecryptionError
from marid.users import User
from tests.api.helpers import BASE, add_collaborator, create_namespace, user_json
from tests.conftest import MakeToken, MakeUser, bearer

SECRET = "s3cr3t-value-never-shown"
KEY_RULE = "Key can only have letters, numbers, and underscores, and cannot start with a number"
TEXT_RULE = "Body text must not contain NUL characters or unpaired surrogates"
EVERYTHING = "variable:read,write,delete namespace:read,write,delete invite:read,write"


def embedded(ns: dict[str, Any]) -> dict[str, Any]:
    """A namespace as a resource embeds it: without its own `parent` (docs/api.md §1.3)."""
    return {**ns, "parent": None, "build": None}


def expected(
    body: dict[str, Any],
    owner: User,
    key: str,
    value: str,
    masked: bool = False,
    author: User | None = None,
    ns: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole Variable entity for `body`'s id and created_at."""
    author = author or owner
    return {
        "id": body["id"],
        "author_id": author.id,
        "user_id": owner.id,
        "namespace_id": ns["id"] if ns else None,
        "key": key,
        "value": "xxxxxx" if masked else value,
        "masked": masked,
        "created_at": body["created_at"],
        "url": f"{BASE}/variables/{body['id']}",
        "author": user_json(author),
        "user": user_json(owner),
        "namespace": embedded(ns) if ns else None,
    }


async def create_variable(api: TestClient, token: str, **fields: Any) -> dict[str, Any]:
    resp = await api.post("/api/variables", headers=bearer(token), json=fields)
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


async def test_create_variable(api: TestClient, alice: User, token: MakeToken):
    resp = await api.post(
        "/api/variables",
        headers=bearer(await token("variable:write")),
        json={"key": "GREETING", "value": "hello world"},
    )
    assert resp.status == 201
    body = await resp.json()
    assert body["created_at"].endswith("Z")
    assert body == expected(body, alice, "GREETING", "hello world")


async def test_masked_value_is_stored_only_encrypted_and_never_shown(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool, config, caplog
):
    caplog.set_level(logging.DEBUG)
    value = await token(EVERYTHING)
    ns = await create_namespace(api, value, "acme", visibility="public")
    texts = []
    resp = await api.post(
        "/api/variables",
        headers=bearer(value),
        json={"key": "API_TOKEN", "value": SECRET, "mask": True, "namespace": "acme"},
    )
    assert resp.status == 201
    texts.append(await resp.text())
    body = await resp.json()
    assert body == expected(body, alice, "API_TOKEN", SECRET, masked=True, ns=ns)
    for path in (
        f"/api/variables/{body['id']}",
        "/api/variables",
        "/api/n/alice/acme/-/variables",
        "/api/n/alice/acme",
        "/api/openapi.json",
    ):
        for headers in (bearer(value), {}):
            resp = await api.get(path, headers=headers)
            texts.append(await resp.text())
    # A failed create does not echo the value either.
    resp = await api.post(
        "/api/variables", headers=bearer(value), json={"key": "1X", "value": SECRET, "mask": 1}
    )
    assert resp.status == 400
    texts.append(await resp.text())

    row = await pool.fetchrow("SELECT * FROM variables WHERE id = $1", body["id"])
    assert row["value"] is None and row["masked"] is True
    stored = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in dict(row).values())
    assert SECRET.encode() not in stored
    dump = await pool.fetchval("SELECT string_agg(v::text, '') FROM variables v")
    assert SECRET not in dump
    for text in texts:
        assert SECRET not in text
    assert "xxxxxx" in texts[0]
    assert SECRET not in caplog.text
    assert "POST /api/variables 201" in caplog.text  # the log was captured

    # The runner, and only the runner, gets the plaintext back.
    async with pool.acquire() as conn:
        found = await variables.get(conn, body["id"])
    assert found is not None
    assert SECRET not in repr(found)
    cipher = Cipher(config.crypto.key)
    assert variables.plaintext(cipher, found) == SECRET
    assert variables.decrypt_value(cipher, alice.id, "API_TOKEN", row["value_sealed"]) == SECRET


async def test_sealed_value_is_bound_to_owner_and_key(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken, pool: asyncpg.Pool, config
):
    body = await create_variable(
        api, await token("variable:write"), key="ONE", value=SECRET, mask=True
    )
    sealed = await pool.fetchval("SELECT value_sealed FROM variables WHERE id = $1", body["id"])
    cipher = Cipher(config.crypto.key)
    bob = await make_user("bob")
    for owner_id, key in ((alice.id, "TWO"), (bob.id, "ONE")):
        with pytest.raises(DecryptionError):
            variables.decrypt_value(cipher, owner_id, key, sealed)
    # The database refuses a masked row that carries its value in plain text.
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "INSERT INTO variables (user_id, author_id, key, masked, value, value_sealed)"
            " VALUES ($1, $1, 'X', true, 'plain', $2)",
            alice.id,
            sealed,
        )


async def test_unmasked_value_is_stored_as_text(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool, config
):
    body = await create_variable(api, await token("variable:write"), key="PLAIN", value="abc")
    row = await pool.fetchrow("SELECT value, value_sealed FROM variables WHERE id = $1", body["id"])
    assert dict(row) == {"value": "abc", "value_sealed": None}
    async with pool.acquire() as conn:
        found = await variables.get(conn, body["id"])
    assert found is not None
    assert variables.plaintext(Cipher(config.crypto.key), found) == "abc"


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, {"key": ["Key field required"], "value": ["Value field required"]}),
        (
            {"key": "", "value": ""},
            {"key": ["Key field required"], "value": ["Value field required"]},
        ),
        (
            {"key": "1BAD", "value": "x", "mask": True},
            {"key": [KEY_RULE], "value": ["Value cannot be shorter than 6 characters in length"]},
        ),
        ({"key": "A-B", "value": "x"}, {"key": [KEY_RULE]}),
        (
            {"key": "OK", "value": "12345", "mask": True},
            {"value": ["Value cannot be shorter than 6 characters in length"]},
        ),
        ({"key": "OK", "value": "x", "mask": "yes"}, {"mask": ["Mask must be a boolean"]}),
        (
            {"key": 1, "value": ["x"], "mask": 0, "namespace": 2},
            {
                "key": ["Key must be a string"],
                "value": ["Value must be a string"],
                "mask": ["Mask must be a boolean"],
                "namespace": ["Namespace must be a string"],
            },
        ),
        ({"key": "OK", "value": "a\x00b"}, {"message": TEXT_RULE}),
        ({"key": "OK", "value": "a\ud800bcdefg", "mask": True}, {"message": TEXT_RULE}),
        (
            {"key": "OK", "value": "x", "namespace": "a b/c"},
            {"namespace": ["Namespace name can only contain letters and numbers"]},
        ),
        (
            {"key": "OK", "value": "x", "namespace": "a" * 33},
            {"namespace": ["Namespace name cannot be longer than 32 characters"]},
        ),
        (
            {"key": "OK", "value": "x", "namespace": "/".join("a" * 21)},
            {"namespace": ["Namespace cannot exceed depth of 20"]},
        ),
        (
            {"key": "OK", "value": "x", "namespace": "team@nobody"},
            {"namespace": ["Namespace permission denied"]},
        ),
    ],
)
async def test_create_variable_validation(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool, body, errors
):
    resp = await api.post(
        "/api/variables", headers=bearer(await token("variable:write")), json=body
    )
    assert resp.status == 400
    assert await resp.json() == errors
    assert await pool.fetchval("SELECT count(*) FROM variables") == 0


async def test_six_character_masked_value_and_short_unmasked_value_are_fine(
    api: TestClient, alice: User, token: MakeToken
):
    value = await token("variable:write")
    masked = await create_variable(api, value, key="SIX", value="123456", mask=True)
    assert masked["value"] == "xxxxxx"
    assert (await create_variable(api, value, key="ONE", value="1", mask=False))["value"] == "1"
    assert (await create_variable(api, value, key="_x9", value="1", mask=None))["masked"] is False


async def test_key_is_unique_per_owner_and_per_namespace(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool
):
    value = await token(EVERYTHING)
    await create_namespace(api, value, "acme")
    await create_namespace(api, value, "other")
    await create_variable(api, value, key="DUP", value="personal")
    await create_variable(api, value, key="DUP", value="in acme", namespace="acme")
    await create_variable(api, value, key="DUP", value="in other", namespace="other")
    await create_variable(api, value, key="dup", value="case differs")
    for namespace in (None, "acme"):
        resp = await api.post(
            "/api/variables",
            headers=bearer(value),
            json={"key": "DUP", "value": "abc", "mask": True, "namespace": namespace},
        )
        assert resp.status == 400
        assert await resp.json() == {
            "key": ["Key already exists"],
            "value": ["Value cannot be shorter than 6 characters in length"],
        }
    # Uniqueness is not checked when the namespace rule failed (docs/api.md §1.4).
    resp = await api.post(
        "/api/variables",
        headers=bearer(value),
        json={"key": "DUP", "value": "abc", "namespace": "acme@nobody"},
    )
    assert await resp.json() == {"namespace": ["Namespace permission denied"]}
    assert await pool.fetchval("SELECT count(*) FROM variables") == 4


async def test_create_in_a_new_namespace_creates_it(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool
):
    value = await token("variable:write namespace:read")
    body = await create_variable(api, value, key="K", value="v", namespace="fresh/child")
    ns = await (await api.get("/api/n/alice/fresh/child", headers=bearer(value))).json()
    assert body == expected(body, alice, "K", "v", ns=ns)
    # A failed request rolls back the namespaces it would have created.
    resp = await api.post(
        "/api/variables", headers=bearer(value), json={"key": "K", "namespace": "gone/child"}
    )
    assert resp.status == 400
    assert await pool.fetchval("SELECT count(*) FROM namespaces WHERE path LIKE 'gone%'") == 0


async def test_collaborator_creates_in_owners_namespace(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken
):
    bob = await make_user("bob")
    mine, bobs = await token(EVERYTHING), await token(EVERYTHING, user=bob)
    ns = await create_namespace(api, mine, "team")
    await add_collaborator(api, mine, "team", "alice", bobs, "bob")
    body = await create_variable(api, bobs, key="K", value="v", namespace="team@alice")
    assert body == expected(body, alice, "K", "v", author=bob, ns=ns)
    # A user who is not a member may not.
    carol = await make_user("carol")
    resp = await api.post(
        "/api/variables",
        headers=bearer(await token(EVERYTHING, user=carol)),
        json={"key": "K2", "value": "v", "namespace": "team@alice"},
    )
    assert await resp.json() == {"namespace": ["Namespace permission denied"]}


async def test_show_variable_access(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken
):
    mine = await token(EVERYTHING)
    bob = await make_user("bob")
    bobs = await token(EVERYTHING, user=bob)
    await create_namespace(api, mine, "pub", visibility="public")
    await create_namespace(api, mine, "inside", visibility="internal")
    await create_namespace(api, mine, "hidden")
    ids = {
        where: (await create_variable(api, mine, key="K", value="v", namespace=where))["id"]
        for where in (None, "pub", "inside", "hidden")
    }
    no_scope = await token("namespace:read")
    bob_no_scope = await token("namespace:read", user=bob)
    cases = [
        # (variable, headers, status)
        (None, bearer(mine), 200),
        (None, bearer(no_scope), 404),
        (None, bearer(bobs), 404),
        (None, {}, 404),
        ("pub", {}, 200),  # public waives variable:read
        ("pub", bearer(bob_no_scope), 200),
        ("inside", {}, 404),
        ("inside", bearer(bobs), 200),
        ("inside", bearer(bob_no_scope), 404),
        ("hidden", bearer(bobs), 404),
        ("hidden", bearer(mine), 200),
    ]
    for where, headers, status in cases:
        resp = await api.get(f"/api/variables/{ids[where]}", headers=headers)
        assert resp.status == status, (where, headers, status)
    for path in ("/api/variables/999999", "/api/variables/" + "9" * 30, "/api/variables/x"):
        assert (await api.get(path, headers=bearer(mine))).status == 404


async def test_delete_variable(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken, pool: asyncpg.Pool
):
    mine = await token(EVERYTHING)
    bob, carol = await make_user("bob"), await make_user("carol")
    bobs, carols = await token(EVERYTHING, user=bob), await token(EVERYTHING, user=carol)
    await create_namespace(api, mine, "pub", visibility="public")
    await add_collaborator(api, mine, "pub", "alice", bobs, "bob")
    personal = await create_variable(api, mine, key="K", value="v")
    shared = await create_variable(api, mine, key="K", value="v", namespace="pub")
    read_write = await token("variable:read,write")
    # No delete scope, another user, a stranger who may see but not use: all 404.
    for path, value in (
        (f"/api/variables/{personal['id']}", read_write),
        (f"/api/variables/{personal['id']}", bobs),
        (f"/api/variables/{shared['id']}", carols),
        (f"/api/variables/{personal['id']}", ""),
    ):
        resp = await api.delete(path, headers=bearer(value) if value else {})
        assert resp.status == 404
        assert await resp.json() == {"message": "Not Found"}
    resp = await api.delete(f"/api/variables/{shared['id']}", headers=bearer(bobs))
    assert resp.status == 204 and await resp.read() == b""
    resp = await api.delete(f"/api/variables/{personal['id']}", headers=bearer(mine))
    assert resp.status == 204
    assert await pool.fetchval("SELECT count(*) FROM variables") == 0
    assert (
        await api.delete(f"/api/variables/{personal['id']}", headers=bearer(mine))
    ).status == 404


async def test_there_is_no_update(api: TestClient, alice: User, token: MakeToken):
    value = await token(EVERYTHING)
    body = await create_variable(api, value, key="K", value="v")
    for method in ("PATCH", "PUT"):
        resp = await api.request(method, f"/api/variables/{body['id']}", headers=bearer(value))
        assert resp.status == 405
        assert await resp.json() == {"message": "Method Not Allowed"}


async def test_list_my_variables(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken
):
    mine = await token(EVERYTHING)
    bob = await make_user("bob")
    bobs = await token(EVERYTHING, user=bob)
    await create_namespace(api, mine, "team")
    await create_namespace(api, bobs, "bobs", visibility="public")
    await create_namespace(api, bobs, "shared")
    await add_collaborator(api, bobs, "shared", "bob", mine, "alice")
    await create_variable(api, mine, key="B_PERSONAL", value="1")
    await create_variable(api, mine, key="A_TEAM", value="2", namespace="team")
    await create_variable(api, bobs, key="C_SHARED", value="3", namespace="shared")
    await create_variable(api, bobs, key="D_PUBLIC", value="4", namespace="bobs")  # not "mine"
    await create_variable(api, bobs, key="E_BOBS", value="5")
    resp = await api.get("/api/variables", headers=bearer(mine))
    assert resp.status == 200
    assert resp.headers["Link"] == (
        f'<{BASE}/variables?page=1>; rel="prev", <{BASE}/variables?page=1>; rel="next"'
    )
    assert [v["key"] for v in await resp.json()] == ["A_TEAM", "B_PERSONAL", "C_SHARED"]
    resp = await api.get("/api/variables?search=shar", headers=bearer(mine))
    assert [v["key"] for v in await resp.json()] == ["C_SHARED"]
    resp = await api.get("/api/variables?search=nothing", headers=bearer(mine))
    assert resp.status == 200 and await resp.json() == []
    resp = await api.get("/api/variables?search=%00", headers=bearer(mine))
    assert resp.status == 400  # api/http.py refuses NUL in query values
    assert (await api.get("/api/variables", headers=bearer(await token("key:read")))).status == 404
    assert (await api.get("/api/variables")).status == 404


async def test_listings_are_paginated(api: TestClient, alice: User, token: MakeToken):
    value = await token(EVERYTHING)
    for i in range(26):
        await create_variable(api, value, key=f"K{i:02}", value="v", namespace="acme")
    for path in ("/api/variables", "/api/n/alice/acme/-/variables"):
        first = await (await api.get(path, headers=bearer(value))).json()
        assert [v["key"] for v in first] == [f"K{i:02}" for i in range(25)]
        resp = await api.get(f"{path}?page=2&search=k", headers=bearer(value))
        assert [v["key"] for v in await resp.json()] == ["K25"]
        url = BASE + path.removeprefix("/api")
        assert resp.headers["Link"] == (
            f'<{url}?page=1&search=k>; rel="prev", <{url}?page=2&search=k>; rel="next"'
        )


async def test_list_namespace_variables(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken
):
    mine = await token(EVERYTHING)
    bob = await make_user("bob")
    bobs = await token(EVERYTHING, user=bob)
    ns = await create_namespace(api, mine, "pub", visibility="public")
    await create_namespace(api, mine, "child", parent="pub")
    await create_namespace(api, mine, "hidden")
    first = await create_variable(api, mine, key="FIRST", value="1", namespace="pub")
    await create_variable(api, mine, key="IN_CHILD", value="2", namespace="pub/child")
    await create_variable(api, mine, key="SECRETISH", value=SECRET, mask=True, namespace="pub")
    await create_variable(api, mine, key="PERSONAL", value="3")
    resp = await api.get("/api/n/alice/pub/-/variables")  # anonymous: public waives the scope
    assert resp.status == 200
    body = await resp.json()
    assert [v["key"] for v in body] == ["FIRST", "SECRETISH"]
    assert body[0] == expected(first, alice, "FIRST", "1", ns=ns)
    assert body[1]["value"] == "xxxxxx"
    resp = await api.get("/api/n/alice/pub/-/variables?search=secret", headers=bearer(bobs))
    assert [v["key"] for v in await resp.json()] == ["SECRETISH"]
    for path, headers in (
        ("/api/n/alice/hidden/-/variables", bearer(bobs)),
        ("/api/n/alice/hidden/-/variables", {}),
        ("/api/n/alice/hidden/-/variables", bearer(await token("variable:read"))),
        ("/api/n/alice/nope/-/variables", bearer(mine)),
        ("/api/n/nobody/pub/-/variables", bearer(mine)),
    ):
        assert (await api.get(path, headers=headers)).status == 404, path
    resp = await api.get("/api/n/alice/hidden/-/variables", headers=bearer(mine))
    assert resp.status == 200 and await resp.json() == []


async def test_deleting_a_namespace_detaches_its_variables(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool
):
    value = await token(EVERYTHING)
    await create_namespace(api, value, "team")
    await create_namespace(api, value, "sub", parent="team")
    in_team = await create_variable(api, value, key="DUP", value="team", namespace="team")
    in_sub = await create_variable(api, value, key="DUP", value="sub", namespace="team/sub")
    personal = await create_variable(api, value, key="DUP", value="personal")
    resp = await api.delete("/api/n/alice/team", headers=bearer(value))  # sub goes with it
    assert resp.status == 204
    for body, kept in ((in_team, "team"), (in_sub, "sub")):
        resp = await api.get(f"/api/variables/{body['id']}", headers=bearer(value))
        assert await resp.json() == expected(body, alice, "DUP", kept)
    listed = await (await api.get("/api/variables", headers=bearer(value))).json()
    assert sorted(v["id"] for v in listed) == sorted(b["id"] for b in (in_team, in_sub, personal))
    # A detached variable does not block a new one, but the personal one still does.
    resp = await api.post(
        "/api/variables", headers=bearer(value), json={"key": "DUP", "value": "x"}
    )
    assert await resp.json() == {"key": ["Key already exists"]}
    await api.delete(f"/api/variables/{personal['id']}", headers=bearer(value))
    await create_variable(api, value, key="DUP", value="new")
    assert await pool.fetchval("SELECT count(*) FROM variables WHERE detached") == 2


async def snapshot(api: TestClient, token: str, pool: asyncpg.Pool, namespace: str | None,
                   table: str) -> list[asyncpg.Record]:  # fmt: skip
    """The rows of `table` (build_variables or build_keys) a new build froze, in order."""
    manifest = "driver: {type: docker, image: busybox, workspace: /w}\n"
    manifest += f"namespace: {namespace}\n" if namespace else ""
    resp = await api.post("/api/builds", headers=bearer(token), json={"manifest": manifest})
    assert resp.status == 201, await resp.text()
    build_id = (await resp.json())["id"]
    order = "position" if table == "build_variables" else "id"
    return list(
        await pool.fetch(f"SELECT * FROM {table} WHERE build_id = $1 ORDER BY {order}", build_id)
    )


async def test_a_build_freezes_the_owners_and_the_namespaces_variables(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool, make_user: MakeUser, config
):
    """docs/manifest.md §5.5: personal variables count only in a build without a namespace, so
    a namespace's build has only the namespace's, whoever submits it (issue 11 row 5)."""
    value = await token(EVERYTHING + " build:write")
    await create_variable(api, value, key="B", value="personal b")
    await create_variable(api, value, key="SHARED", value="personal", mask=True)
    await create_variable(api, value, key="A", value="in acme", namespace="acme")
    await create_variable(api, value, key="SHARED", value="in acme", namespace="acme")
    await create_variable(api, value, key="C", value="elsewhere", namespace="other")
    bob = await make_user("bob")
    bob_token = await token(EVERYTHING + " build:write", user=bob)
    await add_collaborator(api, value, "acme", "alice", bob_token, "bob")
    cipher = Cipher(config.crypto.key)

    def plain(row: asyncpg.Record) -> tuple[str, str]:
        if not row["masked"]:
            return row["key"], row["value"]
        assert row["value"] is None  # a masked value is kept sealed only
        return row["key"], variables.decrypt_value(
            cipher, alice.id, row["key"], row["value_sealed"]
        )

    by_owner = await snapshot(api, value, pool, "acme", "build_variables")
    assert [plain(row) for row in by_owner] == [("A", "in acme"), ("SHARED", "in acme")]
    personal = await snapshot(api, value, pool, None, "build_variables")
    assert [plain(row) for row in personal] == [("B", "personal b"), ("SHARED", "personal")]
    by_collaborator = await snapshot(api, bob_token, pool, "acme@alice", "build_variables")
    assert [plain(row) for row in by_collaborator] == [("A", "in acme"), ("SHARED", "in acme")]
