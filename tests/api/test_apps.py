"""OAuth application registration (docs/api.md §23)."""

import hashlib
import re

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid.users import User
from tests.api.test_tokens import basic
from tests.conftest import MakeToken, MakeUser, bearer

APP = {
    "name": "dashboard",
    "homepage_uri": "https://dash.example.org",
    "redirect_uri": "https://dash.example.org/cb",
}


async def test_register_app_shows_the_secret_once(api: TestClient, alice: User, pool: asyncpg.Pool):
    resp = await api.post("/api/apps", headers=basic(), json=APP)
    assert resp.status == 201
    body = await resp.json()
    secret = body.pop("client_secret")
    assert re.fullmatch(r"[0-9a-f]{64}", secret)
    client_id = body["client_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", client_id)
    assert body.pop("created_at").endswith("Z")
    assert body == {
        **APP,
        "client_id": client_id,
        "description": "",
        "url": f"https://ci.example.com/api/apps/{client_id}",
    }
    stored = await pool.fetchval("SELECT secret_digest FROM apps WHERE client_id = $1", client_id)
    assert stored == hashlib.sha256(secret.encode()).hexdigest()
    listed = await (await api.get("/api/apps", headers=basic())).json()
    assert [a["client_id"] for a in listed] == [client_id]
    assert "client_secret" not in listed[0]


async def test_apps_are_listed_per_user_by_creation(
    api: TestClient, alice: User, make_user: MakeUser
):
    await make_user("bob")
    for name in ("one", "two"):
        assert (await api.post("/api/apps", headers=basic(), json={**APP, "name": name})).ok
    assert (await api.post("/api/apps", headers=basic("bob"), json=APP)).status == 201
    listed = await (await api.get("/api/apps", headers=basic())).json()
    assert [a["name"] for a in listed] == ["one", "two"]


async def test_register_app_validation(api: TestClient, alice: User):
    cases = [
        (
            {},
            {
                "name": ["Name field required"],
                "homepage_uri": ["Homepage URI field required"],
                "redirect_uri": ["Redirect URI field required"],
            },
        ),
        ({**APP, "name": 3}, {"name": ["Name must be a string"]}),
        (
            {**APP, "description": "x" * 256},
            {"description": ["Description cannot be longer than 255 characters in length"]},
        ),
        (
            {**APP, "homepage_uri": "ftp://x.org"},
            {"homepage_uri": ["Homepage URI must be an absolute http or https URL"]},
        ),
        (
            {**APP, "homepage_uri": "/relative"},
            {"homepage_uri": ["Homepage URI must be an absolute http or https URL"]},
        ),
    ]
    for body, errors in cases:
        resp = await api.post("/api/apps", headers=basic(), json=body)
        assert resp.status == 400, body
        assert await resp.json() == errors, body


REDIRECT_URI_ERROR = {
    "redirect_uri": [
        "Redirect URI must be an https URL, or an http URL on a loopback host "
        "(127.0.0.1, [::1] or localhost), without a fragment"
    ]
}


@pytest.mark.parametrize(
    "uri",
    [
        "javascript:alert(document.cookie)",
        "javascript://x.org/%0aalert(1)",
        "data:text/html,<script>alert(1)</script>",
        "file:///etc/passwd",
        "org.example.app:/cb",  # custom schemes: native apps use a loopback http URI
        "ftp://x.org/cb",
        "http://x.org/cb",
        "http://127.0.0.1.x.org/cb",
        "https:///cb",
        "https://x.org/cb#frag",
        "cb",
    ],
)
async def test_redirect_uri_must_be_https_or_loopback_http(api: TestClient, alice: User, uri: str):
    resp = await api.post("/api/apps", headers=basic(), json={**APP, "redirect_uri": uri})
    assert resp.status == 400
    assert await resp.json() == REDIRECT_URI_ERROR


@pytest.mark.parametrize(
    "uri",
    [
        "https://x.org/cb?a=1",
        "http://127.0.0.1:8123/cb",
        "http://[::1]:8123/",
        "http://localhost/cb",
    ],
)
async def test_https_and_loopback_http_redirect_uris_are_accepted(
    api: TestClient, alice: User, uri: str
):
    resp = await api.post("/api/apps", headers=basic(), json={**APP, "redirect_uri": uri})
    assert resp.status == 201
    assert (await resp.json())["redirect_uri"] == uri


async def test_duplicate_app_name_is_a_field_error(api: TestClient, alice: User):
    assert (await api.post("/api/apps", headers=basic(), json=APP)).status == 201
    resp = await api.post("/api/apps", headers=basic(), json=APP)
    assert resp.status == 400
    assert await resp.json() == {"name": ["Name already exists"]}


async def test_apps_auth_is_basic_or_a_bearer_with_app_scope(
    api: TestClient, alice: User, token: MakeToken
):
    for headers in ({}, basic(password="wrong!!"), bearer(await token("token:read,write"))):
        for method, path in (("GET", "/api/apps"), ("POST", "/api/apps"),
                             ("DELETE", "/api/apps/" + "0" * 32)):  # fmt: skip
            resp = await api.request(method, path, headers=headers, json=APP)
            assert resp.status == 401, (method, headers)
            assert resp.headers["WWW-Authenticate"] == 'Basic realm="marid"'
            assert await resp.json() == {"message": "Unauthorized"}
    reader = bearer(await token("app:read"))
    assert (await api.get("/api/apps", headers=reader)).status == 200
    assert (await api.post("/api/apps", headers=reader, json=APP)).status == 401
    writer = bearer(await token("app:write"))
    resp = await api.post("/api/apps", headers=writer, json=APP)
    assert resp.status == 201
    client_id = (await resp.json())["client_id"]
    assert (await api.delete(f"/api/apps/{client_id}", headers=writer)).status == 401
    deleter = bearer(await token("app:delete"))
    assert (await api.delete(f"/api/apps/{client_id}", headers=deleter)).status == 204


async def test_delete_app_of_someone_else_is_not_found(
    api: TestClient, alice: User, make_user: MakeUser
):
    await make_user("bob")
    resp = await api.post("/api/apps", headers=basic("bob"), json=APP)
    client_id = (await resp.json())["client_id"]
    for target in (client_id, "nope"):
        resp = await api.delete(f"/api/apps/{target}", headers=basic())
        assert resp.status == 404
        assert await resp.json() == {"message": "Not Found"}
    assert (await api.delete(f"/api/apps/{client_id}", headers=basic("bob"))).status == 204
    assert await (await api.get("/api/apps", headers=basic("bob"))).json() == []
