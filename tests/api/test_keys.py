"""SSH keys (docs/api.md §13, §8.8): private keys are sealed at rest and never returned."""

from __future__ import annotations

import functools
import logging
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from marid import keys
from marid.crypto import Cipher, DecryptionError
from marid.users import User
from tests.api.helpers import BASE, add_collaborator, create_namespace, user_json
from tests.api.test_variables import embedded, snapshot
from tests.conftest import MakeToken, MakeUser, bearer

EVERYTHING = "key:read,write,delete namespace:read,write,delete invite:read,write"
NAME_RULE = "Name can only have letters, numbers, dots, dashes, and underscores"
PEM = serialization.Encoding.PEM
NO_PASSWORD = serialization.NoEncryption()


@functools.cache
def ed25519_key() -> str:
    """A fresh unencrypted OpenSSH Ed25519 private key (one per test session)."""
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(PEM, serialization.PrivateFormat.OpenSSH, NO_PASSWORD).decode()


@functools.cache
def rsa_key() -> str:
    """A fresh unencrypted PEM (PKCS#1) RSA private key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        PEM, serialization.PrivateFormat.TraditionalOpenSSL, NO_PASSWORD
    ).decode()


def secret_lines(private_key: str) -> list[str]:
    """The base64 body lines of a private key: none may appear anywhere outside the cipher."""
    return [line for line in private_key.splitlines() if line and not line.startswith("-----")]


def expected(
    body: dict[str, Any],
    owner: User,
    name: str,
    config: str = "",
    author: User | None = None,
    ns: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole Key entity for `body`'s id and timestamps."""
    author = author or owner
    return {
        "id": body["id"],
        "author_id": author.id,
        "user_id": owner.id,
        "namespace_id": ns["id"] if ns else None,
        "name": name,
        "config": config,
        "created_at": body["created_at"],
        "updated_at": body["updated_at"],
        "url": f"{BASE}/keys/{body['id']}",
        "author": user_json(author),
        "user": user_json(owner),
        "namespace": embedded(ns) if ns else None,
    }


def when(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp)


async def create_key(api: TestClient, token: str, **fields: Any) -> dict[str, Any]:
    fields.setdefault("key", ed25519_key())
    resp = await api.post("/api/keys", headers=bearer(token), json=fields)
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


async def test_create_key_normalises_the_name(api: TestClient, alice: User, token: MakeToken):
    config = "Host github.com\n  IdentityFile /root/.ssh/deploy_key"
    resp = await api.post(
        "/api/keys",
        headers=bearer(await token("key:write")),
        json={"name": "deploy \t key", "key": ed25519_key(), "config": config},
    )
    assert resp.status == 201
    body = await resp.json()
    assert body["created_at"] == body["updated_at"] and body["created_at"].endswith("Z")
    assert body == expected(body, alice, "deploy_key", config)
    assert "key" not in body


async def test_private_key_is_stored_only_encrypted_and_never_returned(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool, config, caplog
):
    caplog.set_level(logging.DEBUG)
    value = await token(EVERYTHING)
    ns = await create_namespace(api, value, "acme", visibility="public")
    private = rsa_key()
    texts = []
    resp = await api.post(
        "/api/keys",
        headers=bearer(value),
        # Windows line endings: the \r characters are removed before storage.
        json={"name": "rsa", "key": private.replace("\n", "\r\n"), "namespace": "acme"},
    )
    assert resp.status == 201
    texts.append(await resp.text())
    body = await resp.json()
    assert body == expected(body, alice, "rsa", ns=ns)
    resp = await api.patch(f"/api/keys/{body['id']}", headers=bearer(value), json={"key": "x"})
    texts.append(await resp.text())
    for path in (
        f"/api/keys/{body['id']}",
        "/api/keys",
        "/api/n/alice/acme/-/keys",
        "/api/openapi.json",
    ):
        for headers in (bearer(value), {}):
            texts.append(await (await api.get(path, headers=headers)).text())
    # A rejected create (duplicate name) does not echo the key either.
    resp = await api.post(
        "/api/keys",
        headers=bearer(value),
        json={"name": "rsa", "key": private, "namespace": "acme"},
    )
    assert resp.status == 400
    texts.append(await resp.text())

    row = await pool.fetchrow("SELECT * FROM ssh_keys WHERE id = $1", body["id"])
    stored = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in dict(row).values())
    dump = await pool.fetchval("SELECT string_agg(k::text, '') FROM ssh_keys k")
    lines = secret_lines(private)
    assert len(lines) > 10
    for line in lines:
        assert line.encode() not in stored
        assert line not in dump
        assert line not in caplog.text
        for text in texts:
            assert line not in text
    assert "POST /api/keys 201" in caplog.text  # the log was captured

    # The runner, and only the runner, gets the key back, without \r.
    async with pool.acquire() as conn:
        found = await keys.get(conn, body["id"])
    assert found is not None
    assert lines[0] not in repr(found)
    cipher = Cipher(config.crypto.key)
    assert keys.private_key(cipher, found) == private
    assert keys.decrypt_key(cipher, alice.id, "rsa", row["key_sealed"]) == private
    with pytest.raises(DecryptionError):
        keys.decrypt_key(cipher, alice.id, "other", row["key_sealed"])


@functools.cache
def accepted_keys() -> dict[str, str]:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = serialization.PrivateFormat.PKCS8
    return {
        "openssh_ed25519": ed25519_key(),
        "pem_rsa": rsa_key(),
        "pkcs8_ed25519": ed25519.Ed25519PrivateKey.generate()
        .private_bytes(PEM, pkcs8, NO_PASSWORD)
        .decode(),
        "openssh_ecdsa": ec_key.private_bytes(
            PEM, serialization.PrivateFormat.OpenSSH, NO_PASSWORD
        ).decode(),
    }


@pytest.mark.parametrize("kind", ["openssh_ed25519", "pem_rsa", "pkcs8_ed25519", "openssh_ecdsa"])
async def test_accepted_key_formats(api: TestClient, alice: User, token: MakeToken, kind: str):
    await create_key(api, await token("key:write"), name=kind, key=accepted_keys()[kind])


def rejected_keys() -> dict[str, str]:
    # PEM: passphrase-protected OpenSSH keys need bcrypt, which is not installed.
    encrypted = ed25519.Ed25519PrivateKey.generate().private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pass")
    )
    public = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    not_ssh = x25519.X25519PrivateKey.generate().private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, NO_PASSWORD
    )
    return {
        "passphrase": encrypted.decode(),
        "public": public.decode(),
        "x25519": not_ssh.decode(),
        "garbage": "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----",
        "text": "not a key",
    }


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, {"name": ["Name field required"], "key": ["Key field required"]}),
        (
            {"name": "", "key": "", "config": None},
            {"name": ["Name field required"], "key": ["Key field required"]},
        ),
        ({"name": "ok", "key": "\r\r"}, {"key": ["Key field required"]}),
        ({"name": "a/b", "key": "$ED25519"}, {"name": [NAME_RULE]}),
        ({"name": "ok", "key": "$ED25519", "config": 7}, {"config": ["Config must be a string"]}),
        (
            {"name": "ok", "key": "$ED25519", "config": "a\x00"},
            {"message": "Body text must not contain NUL characters or unpaired surrogates"},
        ),
        (
            {"name": ["x"], "key": 1, "namespace": True},
            {
                "name": ["Name must be a string"],
                "key": ["Key must be a string"],
                "namespace": ["Namespace must be a string"],
            },
        ),
        (
            {"name": "b@d", "key": "nope", "namespace": "x@nobody"},
            {
                "name": [NAME_RULE],
                "key": ["Key is not a valid SSH private key"],
                "namespace": ["Namespace permission denied"],
            },
        ),
        (
            {"name": "ok", "key": "$ED25519", "namespace": "-"},
            {"namespace": ["Namespace name can only contain letters and numbers"]},
        ),
    ],
)
async def test_create_key_validation(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool, body, errors
):
    if body.get("key") == "$ED25519":
        body = {**body, "key": ed25519_key()}
    resp = await api.post("/api/keys", headers=bearer(await token("key:write")), json=body)
    assert resp.status == 400
    assert await resp.json() == errors
    assert await pool.fetchval("SELECT count(*) FROM ssh_keys") == 0


async def test_invalid_keys_are_rejected(api: TestClient, alice: User, token: MakeToken):
    value = await token("key:write")
    for kind, text in rejected_keys().items():
        resp = await api.post("/api/keys", headers=bearer(value), json={"name": "k", "key": text})
        assert resp.status == 400, kind
        assert await resp.json() == {"key": ["Key is not a valid SSH private key"]}, kind


async def test_whitespace_only_name_becomes_an_underscore(
    api: TestClient, alice: User, token: MakeToken
):
    body = await create_key(api, await token("key:write"), name=" \n ")
    assert body["name"] == "_"


async def test_name_is_unique_per_owner_and_per_namespace(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool
):
    value = await token(EVERYTHING)
    await create_key(api, value, name="deploy")
    await create_key(api, value, name="deploy", namespace="acme")
    await create_key(api, value, name="deploy", namespace="acme/child")
    await create_key(api, value, name="Deploy")
    for name, namespace in (("deploy", None), ("deploy", "acme"), ("deploy", "acme/child")):
        resp = await api.post(
            "/api/keys",
            headers=bearer(value),
            json={"name": name, "key": "bad", "namespace": namespace},
        )
        assert await resp.json() == {
            "name": ["Name already exists"],
            "key": ["Key is not a valid SSH private key"],
        }
    resp = await api.post(
        "/api/keys",
        headers=bearer(value),
        json={"name": "deploy", "key": ed25519_key(), "namespace": "acme@nobody"},
    )
    assert await resp.json() == {"namespace": ["Namespace permission denied"]}
    assert await pool.fetchval("SELECT count(*) FROM ssh_keys") == 4


async def test_collaborator_adds_a_key_to_the_owners_namespace(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken
):
    bob = await make_user("bob")
    mine, bobs = await token(EVERYTHING), await token(EVERYTHING, user=bob)
    ns = await create_namespace(api, mine, "team")
    await add_collaborator(api, mine, "team", "alice", bobs, "bob")
    body = await create_key(api, bobs, name="k", namespace="team@alice")
    assert body == expected(body, alice, "k", author=bob, ns=ns)


async def test_update_key_changes_only_config(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool, config
):
    value = await token(EVERYTHING)
    body = await create_key(api, value, name="k", config="Host a")
    cases = [
        ({"config": "Host b"}, "Host b"),
        ({}, "Host b"),
        ({"config": ""}, "Host b"),
        ({"config": None}, "Host b"),
        ({"name": "renamed", "namespace": "acme", "key": rsa_key(), "config": "Host c"}, "Host c"),
    ]
    previous = body["updated_at"]
    for patch, config_now in cases:
        resp = await api.patch(f"/api/keys/{body['id']}", headers=bearer(value), json=patch)
        assert resp.status == 200, patch
        updated = await resp.json()
        assert updated == expected(updated, alice, "k", config_now), patch
        assert updated["created_at"] == body["created_at"]
        assert when(updated["updated_at"]) > when(previous), patch
        previous = updated["updated_at"]
    async with pool.acquire() as conn:
        found = await keys.get(conn, body["id"])
    assert found is not None
    assert keys.private_key(Cipher(config.crypto.key), found) == ed25519_key()  # key unchanged
    assert await pool.fetchval("SELECT count(*) FROM namespaces") == 0
    for bad in ({"config": 5}, {"config": ["x"]}):
        resp = await api.patch(f"/api/keys/{body['id']}", headers=bearer(value), json=bad)
        assert resp.status == 400
        assert await resp.json() == {"config": ["Config must be a string"]}
    resp = await api.patch(f"/api/keys/{body['id']}", headers=bearer(value), data=b"{")
    assert await resp.json() == {"message": "Malformed JSON body"}


async def test_update_and_delete_access(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken, pool: asyncpg.Pool
):
    mine = await token(EVERYTHING)
    bob, carol = await make_user("bob"), await make_user("carol")
    bobs, carols = await token(EVERYTHING, user=bob), await token(EVERYTHING, user=carol)
    await create_namespace(api, mine, "pub", visibility="public")
    await add_collaborator(api, mine, "pub", "alice", bobs, "bob")
    personal = await create_key(api, mine, name="k")
    shared = await create_key(api, mine, name="k", namespace="pub")
    read_only = await token("key:read")
    denied = [
        (personal, read_only),
        (personal, bobs),
        (shared, carols),  # may see (public) but not use
        (personal, None),
    ]
    for method, body in (("PATCH", {"config": "x"}), ("DELETE", None)):
        for key, value in denied:
            resp = await api.request(
                method,
                f"/api/keys/{key['id']}",
                headers=bearer(value) if value else {},
                json=body,
            )
            assert resp.status == 404, (method, key["id"], value)
            assert await resp.json() == {"message": "Not Found"}
    resp = await api.patch(f"/api/keys/{shared['id']}", headers=bearer(bobs), json={"config": "y"})
    assert resp.status == 200 and (await resp.json())["config"] == "y"
    resp = await api.delete(f"/api/keys/{shared['id']}", headers=bearer(bobs))
    assert resp.status == 204 and await resp.read() == b""
    assert (await api.delete(f"/api/keys/{personal['id']}", headers=bearer(mine))).status == 204
    assert await pool.fetchval("SELECT count(*) FROM ssh_keys") == 0
    for method in ("GET", "PATCH", "DELETE"):
        resp = await api.request(method, f"/api/keys/{personal['id']}", headers=bearer(mine))
        assert resp.status == 404


async def test_show_key_access(api: TestClient, alice: User, make_user: MakeUser, token: MakeToken):
    mine = await token(EVERYTHING)
    bob = await make_user("bob")
    bobs = await token(EVERYTHING, user=bob)
    pub = await create_namespace(api, mine, "pub", visibility="public")
    await create_namespace(api, mine, "inside", visibility="internal")
    await create_namespace(api, mine, "hidden")
    ids = {
        where: (await create_key(api, mine, name="k", namespace=where))["id"]
        for where in (None, "pub", "inside", "hidden")
    }
    bob_no_scope = await token("namespace:read", user=bob)
    cases = [
        (None, bearer(mine), 200),
        (None, bearer(await token("namespace:read")), 404),
        (None, bearer(bobs), 404),
        (None, {}, 404),
        ("pub", {}, 200),
        ("pub", bearer(bob_no_scope), 200),
        ("inside", {}, 404),
        ("inside", bearer(bobs), 200),
        ("inside", bearer(bob_no_scope), 404),
        ("hidden", bearer(bobs), 404),
    ]
    for where, headers, status in cases:
        resp = await api.get(f"/api/keys/{ids[where]}", headers=headers)
        assert resp.status == status, (where, headers, status)
    body = await (await api.get(f"/api/keys/{ids['pub']}")).json()
    assert body == expected(body, alice, "k", ns=pub)


async def test_list_keys(api: TestClient, alice: User, make_user: MakeUser, token: MakeToken):
    mine = await token(EVERYTHING)
    bob = await make_user("bob")
    bobs = await token(EVERYTHING, user=bob)
    await create_namespace(api, bobs, "bobs", visibility="public")
    await create_namespace(api, bobs, "shared")
    await add_collaborator(api, bobs, "shared", "bob", mine, "alice")
    await create_key(api, mine, name="b-personal")
    await create_key(api, mine, name="a-team", namespace="team")
    await create_key(api, mine, name="a-child", namespace="team/child")
    await create_key(api, bobs, name="c-shared", namespace="shared")
    await create_key(api, bobs, name="d-public", namespace="bobs")
    await create_key(api, bobs, name="e-bobs")
    resp = await api.get("/api/keys", headers=bearer(mine))
    assert resp.status == 200
    assert (
        resp.headers["Link"]
        == f'<{BASE}/keys?page=1>; rel="prev", <{BASE}/keys?page=1>; rel="next"'
    )
    names = [k["name"] for k in await resp.json()]
    assert names == ["a-child", "a-team", "b-personal", "c-shared"]
    resp = await api.get("/api/keys?search=TEAM", headers=bearer(mine))
    assert [k["name"] for k in await resp.json()] == ["a-team"]
    resp = await api.get("/api/keys?search=%00", headers=bearer(mine))
    assert resp.status == 400  # api/http.py refuses NUL in query values
    assert (await api.get("/api/keys", headers=bearer(await token("variable:read")))).status == 404
    # The namespace listing: exactly that namespace, public to anyone.
    resp = await api.get("/api/n/alice/team/-/keys", headers=bearer(mine))
    assert [k["name"] for k in await resp.json()] == ["a-team"]
    resp = await api.get("/api/n/bob/bobs/-/keys")
    assert [k["name"] for k in await resp.json()] == ["d-public"]
    resp = await api.get("/api/n/bob/bobs/-/keys?search=zzz&page=3")
    assert resp.status == 200 and await resp.json() == []
    url = f"{BASE}/n/bob/bobs/-/keys"
    assert resp.headers["Link"] == (
        f'<{url}?page=1&search=zzz>; rel="prev", <{url}?page=1&search=zzz>; rel="next"'
    )
    for path, headers in (
        ("/api/n/alice/team/-/keys", {}),
        ("/api/n/alice/team/-/keys", bearer(bobs)),
        ("/api/n/alice/team/-/keys", bearer(await token("key:read"))),
    ):
        assert (await api.get(path, headers=headers)).status == 404


async def test_keys_listing_is_paginated(api: TestClient, alice: User, token: MakeToken):
    value = await token(EVERYTHING)
    for i in range(26):
        await create_key(api, value, name=f"k{i:02}")
    first = await (await api.get("/api/keys", headers=bearer(value))).json()
    assert [k["name"] for k in first] == [f"k{i:02}" for i in range(25)]
    second = await (await api.get("/api/keys?page=2", headers=bearer(value))).json()
    assert [k["name"] for k in second] == ["k25"]


async def test_deleting_a_namespace_detaches_its_keys(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool
):
    value = await token(EVERYTHING)
    in_team = await create_key(api, value, name="k", namespace="team")
    in_sub = await create_key(api, value, name="k", namespace="team/sub")
    personal = await create_key(api, value, name="k")
    assert (await api.delete("/api/n/alice/team", headers=bearer(value))).status == 204
    for body in (in_team, in_sub):
        resp = await api.get(f"/api/keys/{body['id']}", headers=bearer(value))
        assert await resp.json() == expected(body, alice, "k")
    listed = await (await api.get("/api/keys", headers=bearer(value))).json()
    assert sorted(k["id"] for k in listed) == sorted(b["id"] for b in (in_team, in_sub, personal))
    await api.delete(f"/api/keys/{personal['id']}", headers=bearer(value))
    await create_key(api, value, name="k")
    assert await pool.fetchval("SELECT count(*) FROM ssh_keys WHERE detached") == 2


async def test_a_build_freezes_the_owners_and_the_namespaces_keys(
    api: TestClient, token: MakeToken, pool: asyncpg.Pool, make_user: MakeUser, config
):
    """docs/manifest.md §5.5: personal keys count only in a build without a namespace, so a
    namespace's build has only the namespace's, whoever submits it (issue 11 row 5)."""
    value = await token(EVERYTHING + " build:write")
    await create_key(api, value, name="b", config="personal b")
    await create_key(api, value, name="same", config="personal")
    await create_key(api, value, name="a", config="in acme", namespace="acme")
    await create_key(api, value, name="same", config="in acme", namespace="acme")
    await create_key(api, value, name="c", config="elsewhere", namespace="other")
    bob = await make_user("bob")
    bob_token = await token(EVERYTHING + " build:write", user=bob)
    await add_collaborator(api, value, "acme", "alice", bob_token, "bob")
    cipher = Cipher(config.crypto.key)
    by_owner = await snapshot(api, value, pool, "acme", "build_keys")
    assert [(k["name"], k["config"], k["location"]) for k in by_owner] == [
        ("a", "in acme", "/root/.ssh/a"),
        ("same", "in acme", "/root/.ssh/same"),
    ]
    personal = await snapshot(api, value, pool, None, "build_keys")
    assert [(k["name"], k["config"]) for k in personal] == [
        ("b", "personal b"),
        ("same", "personal"),
    ]
    alice_id = await pool.fetchval("SELECT id FROM users WHERE username = 'alice'")
    for k in by_owner + personal:
        assert keys.decrypt_key(cipher, alice_id, k["name"], k["key_sealed"]) == ed25519_key()
    by_collaborator = await snapshot(api, bob_token, pool, "acme@alice", "build_keys")
    assert [k["name"] for k in by_collaborator] == ["a", "same"]
