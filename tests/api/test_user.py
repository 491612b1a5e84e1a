import base64

from aiohttp.test_utils import TestClient

from marid.users import User
from tests.conftest import MakeToken, bearer


async def test_get_user_returns_the_token_owner(api: TestClient, alice: User, token: MakeToken):
    resp = await api.get("/api/user", headers=bearer(await token("")))
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    assert await resp.json() == {
        "email": "alice@example.com",
        "username": "alice",
        "created_at": alice.created_at.isoformat().replace("+00:00", "Z"),
    }


async def test_bearer_scheme_is_case_insensitive(api: TestClient, token: MakeToken):
    resp = await api.get("/api/user", headers={"Authorization": f"bEaReR {await token()}"})
    assert resp.status == 200


async def test_get_user_without_token_is_not_found(api: TestClient):
    resp = await api.get("/api/user")
    assert resp.status == 404
    assert await resp.json() == {"message": "Not Found"}


async def test_unknown_and_malformed_tokens_are_not_found(api: TestClient, token: MakeToken):
    await token()
    for value in ("mrd_" + "0" * 64, "nonsense", ""):
        resp = await api.get("/api/user", headers=bearer(value))
        assert resp.status == 404, value


async def test_http_basic_counts_as_no_token_outside_tokens(api: TestClient, alice: User):
    basic = base64.b64encode(b"alice:password1").decode()
    resp = await api.get("/api/user", headers={"Authorization": f"Basic {basic}"})
    assert resp.status == 404


async def test_api_root_lists_collection_urls(api: TestClient):
    expected = {
        f"{name}_url": f"https://ci.example.com/api/{name}"
        for name in (
            "builds",
            "namespaces",
            "cron",
            "invites",
            "images",
            "objects",
            "variables",
            "keys",
        )
    }
    for path in ("/api", "/api/"):
        resp = await api.get(path)
        assert resp.status == 200
        assert await resp.json() == expected
