import base64
import hashlib
import re

import asyncpg
from aiohttp.test_utils import TestClient

from marid.users import User
from tests.conftest import MakeToken, MakeUser, bearer


def basic(handle: str = "alice", password: str = "password1") -> dict[str, str]:
    encoded = base64.b64encode(f"{handle}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


async def test_create_token_with_basic_auth_shows_the_value_once(
    api: TestClient, alice: User, pool: asyncpg.Pool
):
    resp = await api.post("/api/tokens", headers=basic(), json={"name": "t", "scope": "build:read"})
    assert resp.status == 201
    body = await resp.json()
    value = body.pop("token")
    assert re.fullmatch(r"mrd_[0-9a-f]{64}", value)
    created = body.pop("created_at")
    assert created.endswith("Z")
    assert body == {
        "id": body["id"],
        "name": "t",
        "scope": "build:read",
        "app": None,
        "last_used_at": None,
        "url": f"https://ci.example.com/api/tokens/{body['id']}",
    }
    # Stored only as its SHA-256 digest.
    stored = await pool.fetchval("SELECT digest FROM tokens WHERE id = $1", body["id"])
    assert stored == hashlib.sha256(value.encode()).hexdigest()
    assert not await pool.fetchval("SELECT count(*) FROM tokens WHERE digest = $1", value)
    # ... and it works, and the listing never shows the value again.
    assert (await api.get("/api/user", headers=bearer(value))).status == 200
    listed = await (await api.get("/api/tokens", headers=basic())).json()
    assert [t["name"] for t in listed] == ["t"]
    assert "token" not in listed[0]


async def test_basic_auth_accepts_email_as_handle(api: TestClient, alice: User):
    resp = await api.get("/api/tokens", headers=basic("alice@example.com"))
    assert resp.status == 200


async def test_bad_credentials_get_401_with_challenge(
    api: TestClient, alice: User, token: MakeToken
):
    for headers in ({}, basic(password="wrong!!"), basic("nobody"), bearer("mrd_" + "1" * 64)):
        resp = await api.get("/api/tokens", headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="marid"'
        assert await resp.json() == {"message": "Unauthorized"}


async def test_bearer_needs_token_scope(api: TestClient, token: MakeToken):
    resp = await api.get("/api/tokens", headers=bearer(await token("build:read")))
    assert resp.status == 401
    resp = await api.get("/api/tokens", headers=bearer(await token("token:read")))
    assert resp.status == 200


async def test_token_cannot_mint_more_scope_than_it_holds(api: TestClient, token: MakeToken):
    holder = await token("token:write build:read")
    resp = await api.post(
        "/api/tokens", headers=bearer(holder), json={"name": "x", "scope": "build:read,write"}
    )
    assert resp.status == 400
    assert await resp.json() == {"scope": ["Scope exceeds the scope of the authenticating token"]}
    resp = await api.post(
        "/api/tokens", headers=bearer(holder), json={"name": "x", "scope": "build:read"}
    )
    assert resp.status == 201


async def test_scope_is_stored_canonically(api: TestClient, alice: User):
    resp = await api.post(
        "/api/tokens",
        headers=basic(),
        json={"name": "c", "scope": "  namespace:read build:write build:read,read "},
    )
    assert (await resp.json())["scope"] == "build:read,write namespace:read"


async def test_create_token_validation(api: TestClient, alice: User):
    cases = [
        ({}, {"name": ["Name field required"]}),
        ({"name": ""}, {"name": ["Name field required"]}),
        ({"name": "x" * 256}, {"name": ["Name cannot be longer than 255 characters in length"]}),
        ({"name": 5}, {"name": ["Name must be a string"]}),
        ({"name": "a", "scope": 3}, {"scope": ["Scope must be a string"]}),
        ({"name": "a", "scope": "bogus:read"}, {"scope": ["Scope unknown resource: bogus"]}),
        ({"name": "a", "scope": "build:fly"}, {"scope": ["Scope unknown permission: fly"]}),
        ({"name": "a", "scope": "build"}, {"scope": ["Scope invalid scope item: build"]}),
        (
            {"name": None, "scope": "build:"},
            {"name": ["Name field required"], "scope": ["Scope invalid scope item: build:"]},
        ),
    ]
    for body, errors in cases:
        resp = await api.post("/api/tokens", headers=basic(), json=body)
        assert resp.status == 400, body
        assert await resp.json() == errors, body


async def test_duplicate_token_name_is_a_field_error(
    api: TestClient, alice: User, pool: asyncpg.Pool
):
    assert (await api.post("/api/tokens", headers=basic(), json={"name": "dup"})).status == 201
    resp = await api.post("/api/tokens", headers=basic(), json={"name": "dup"})
    assert resp.status == 400
    assert await resp.json() == {"name": ["Name already exists"]}
    assert await pool.fetchval("SELECT count(*) FROM tokens WHERE name = 'dup'") == 1


async def test_revoked_token_stops_working(api: TestClient, alice: User, token: MakeToken):
    value = await token("token:delete")
    listed = await (await api.get("/api/tokens", headers=basic())).json()
    resp = await api.delete(f"/api/tokens/{listed[0]['id']}", headers=bearer(value))
    assert resp.status == 204
    assert await resp.read() == b""
    assert (await api.get("/api/user", headers=bearer(value))).status == 404


async def test_cannot_delete_another_users_token(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken
):
    bob = await make_user("bob")
    await token(user=bob)
    listed = await (await api.get("/api/tokens", headers=basic("bob"))).json()
    for path in (f"/api/tokens/{listed[0]['id']}", "/api/tokens/999999", "/api/tokens/" + "9" * 30):
        resp = await api.delete(path, headers=basic())
        assert resp.status == 404, path
    assert len(await (await api.get("/api/tokens", headers=basic("bob"))).json()) == 1


async def test_last_used_at_is_recorded(api: TestClient, alice: User, token: MakeToken):
    value = await token("token:read")
    first = await (await api.get("/api/tokens", headers=bearer(value))).json()
    assert first[0]["last_used_at"] is not None and first[0]["last_used_at"].endswith("Z")
