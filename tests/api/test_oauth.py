"""The OAuth authorization-code flow (docs/api.md §16), driven like a third-party client would."""

import asyncio
import logging
import re
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from authlib.integrations.requests_client import OAuth2Session, OAuthError

from marid.users import User
from tests.api.test_tokens import basic
from tests.conftest import MakeUser, bearer

REDIRECT = "https://dash.example.org/cb"
# RFC 6749 §5.2 bodies; `message` stays beside them for Djinn's clients (docs/api.md §16.3).
BAD_CLIENT = {
    "error": "invalid_client",
    "error_description": "Invalid client credentials",
    "message": "Invalid client credentials",
}
BAD_CODE = {
    "error": "invalid_grant",
    "error_description": "Invalid or expired code",
    "message": "Invalid or expired code",
}
SCOPE = "namespace:read build:read"  # canonical: "build:read namespace:read"


async def register(api: TestClient, name: str = "dash<b>", handle: str = "alice",
                   redirect_uri: str = REDIRECT) -> dict[str, Any]:  # fmt: skip
    body = {"name": name, "homepage_uri": "https://dash.example.org", "redirect_uri": redirect_uri}
    resp = await api.post("/api/apps", headers=basic(handle), json=body)
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


@pytest.fixture
async def app(api: TestClient, alice: User) -> dict[str, Any]:
    return await register(api)


def consent_form(app: dict[str, Any], scope: str = SCOPE, **fields: str) -> dict[str, str]:
    return {"client_id": app["client_id"], "scope": scope, "state": "xyz",
            "handle": "alice", "password": "password1", "authorize": "true", **fields}  # fmt: skip


async def authorize(api: TestClient, form: dict[str, str]) -> tuple[int, dict[str, list[str]]]:
    resp = await api.post("/login/oauth/authorize", data=form, allow_redirects=False)
    if resp.status != 303:
        return resp.status, {}
    location = resp.headers["Location"]
    assert location.startswith(REDIRECT + "?"), location
    return 303, parse_qs(urlsplit(location).query)


async def code_for(api: TestClient, app: dict[str, Any], scope: str = SCOPE) -> str:
    status, params = await authorize(api, consent_form(app, scope))
    assert status == 303
    return params["code"][0]


async def exchange(api: TestClient, app: dict[str, Any], code: str, **extra: Any) -> Any:
    form = {"client_id": app["client_id"], "client_secret": app["client_secret"], "code": code}
    return await api.post(
        "/login/oauth/token", data=form, headers={"Accept": "application/json"}, **extra
    )


async def test_the_flow_through_the_consent_page_grants_exactly_the_scope(
    api: TestClient, app: dict[str, Any]
):
    query = urlencode({"client_id": app["client_id"], "scope": SCOPE, "state": 'x"y'})
    resp = await api.get(f"/login/oauth/authorize?{query}")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    page = await resp.text()
    assert "dash&lt;b&gt;" in page and "dash<b>" not in page
    assert "<code>build:read</code>" in page and "<code>namespace:read</code>" in page
    assert f'name="client_id" value="{app["client_id"]}"' in page
    assert 'name="state" value="x&quot;y"' in page
    assert 'name="handle"' in page and 'name="password"' in page

    status, params = await authorize(api, consent_form(app))
    assert status == 303
    code = params["code"][0]
    assert re.fullmatch(r"[0-9a-f]{32}", code)
    assert params["state"] == ["xyz"]

    resp = await exchange(api, app, code)
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    assert re.fullmatch(r"mrd_[0-9a-f]{64}", body["access_token"])
    assert body == {**body, "token_type": "bearer", "scope": "build:read namespace:read"}
    assert len(body) == 3

    token = body["access_token"]
    assert (await api.get("/api/builds", headers=bearer(token))).status == 200
    assert (await api.get("/api/namespaces", headers=bearer(token))).status == 200
    for path in ("/api/variables", "/api/keys"):  # not granted: 404 (§1.6)
        assert (await api.get(path, headers=bearer(token))).status == 404
    resp = await api.post("/api/builds", headers=bearer(token), json={"manifest": "x"})
    assert resp.status == 404

    listed = await (await api.get("/api/tokens", headers=basic())).json()
    assert [(t["name"], t["scope"], t["app"]) for t in listed] == [
        ("dash<b>", "build:read namespace:read", {"client_id": app["client_id"], "name": "dash<b>"})
    ]


async def test_exchange_without_json_accept_is_form_encoded_with_sorted_keys(
    api: TestClient, app: dict[str, Any]
):
    code = await code_for(api, app, "build:write,read")
    form = {"client_id": app["client_id"], "client_secret": app["client_secret"], "code": code}
    resp = await api.post("/login/oauth/token", data=form)
    assert resp.status == 200
    assert resp.content_type == "application/x-www-form-urlencoded"
    text = await resp.text()
    value = parse_qs(text)["access_token"][0]
    assert text == f"access_token={value}&scope=build%3Aread%2Cwrite&token_type=bearer"
    assert (await api.get("/api/builds", headers=bearer(value))).status == 200


async def test_client_may_authenticate_with_basic_or_the_secret_alias(
    api: TestClient, app: dict[str, Any]
):
    code = await code_for(api, app)
    auth = basic(app["client_id"], app["client_secret"])
    # Basic wins over (wrong) form credentials.
    form = {"client_id": app["client_id"], "client_secret": "0" * 64, "code": code}
    resp = await api.post("/login/oauth/token", data=form, headers=auth)
    assert resp.status == 200
    code = await code_for(api, app)
    form = {"client_id": app["client_id"], "secret": app["client_secret"], "code": code}
    assert (await api.post("/login/oauth/token", data=form)).status == 200


async def test_bad_client_credentials_are_401(api: TestClient, app: dict[str, Any]):
    code = await code_for(api, app)
    wrong = {**app, "client_secret": "0" * 64}
    good_form = {"client_id": app["client_id"], "client_secret": app["client_secret"], "code": code}
    attempts = [
        await exchange(api, wrong, code),
        await exchange(api, {**app, "client_id": "f" * 32}, code),
        await api.post("/login/oauth/token", data={"code": code}),
        # Basic takes precedence: a wrong Basic header fails even with good form fields.
        await api.post(
            "/login/oauth/token", data=good_form, headers=basic(app["client_id"], "0" * 64)
        ),
    ]
    for resp in attempts:
        assert resp.status == 401
        assert await resp.json() == BAD_CLIENT
    # The code survived the failed attempts.
    assert (await exchange(api, app, code)).status == 200


async def test_reused_expired_and_foreign_codes_are_refused(
    api: TestClient, app: dict[str, Any], pool: asyncpg.Pool
):
    code = await code_for(api, app)
    assert (await exchange(api, app, code)).status == 200
    expired = await code_for(api, app)
    await pool.execute("UPDATE oauth_codes SET expires_at = now() - interval '1 second'")
    other = await register(api, "other")
    foreign = await code_for(api, app)
    for client, value in ((app, code), (app, expired), (other, foreign), (app, "nope"), (app, "")):
        resp = await exchange(api, client, value)
        assert resp.status == 400, value
        assert await resp.json() == BAD_CODE
        assert (resp.headers["Cache-Control"], resp.headers["Pragma"]) == ("no-store", "no-cache")
    form = {"client_id": app["client_id"], "client_secret": app["client_secret"]}
    resp = await api.post("/login/oauth/token", data=form)
    assert (resp.status, await resp.json()) == (
        400,
        {
            "error": "invalid_request",
            "error_description": "Missing 'code' in request.",
            "message": "Missing 'code' in request.",
        },
    )
    assert (await exchange(api, app, foreign)).status == 200


async def test_a_new_exchange_replaces_the_users_token_for_the_app(
    api: TestClient, app: dict[str, Any]
):
    first = (await (await exchange(api, app, await code_for(api, app))).json())["access_token"]
    code = await code_for(api, app, "variable:read")
    second = (await (await exchange(api, app, code)).json())["access_token"]
    assert (await api.get("/api/user", headers=bearer(first))).status == 404
    assert (await api.get("/api/variables", headers=bearer(second))).status == 200
    listed = await (await api.get("/api/tokens", headers=basic())).json()
    assert [t["scope"] for t in listed] == ["variable:read"]


async def test_deny_redirects_with_access_denied(api: TestClient, alice: User):
    app = await register(api, redirect_uri=REDIRECT + "?x=1")
    form = consent_form(app, authorize="false", password="")
    resp = await api.post("/login/oauth/authorize", data=form, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == REDIRECT + "?x=1&error=access_denied&state=xyz"
    form = consent_form(app, state="")
    resp = await api.post("/login/oauth/authorize", data=form, allow_redirects=False)
    assert re.fullmatch(re.escape(REDIRECT) + r"\?x=1&code=[0-9a-f]{32}", resp.headers["Location"])


async def test_bad_user_credentials_show_the_form_again_with_401(
    api: TestClient, app: dict[str, Any], make_user: MakeUser, pool: asyncpg.Pool
):
    await make_user("bob")
    for handle, password in (("alice", "wrong!!"), ("nobody", "password1"), ("", "")):
        form = consent_form(app, handle=handle, password=password)
        resp = await api.post("/login/oauth/authorize", data=form, allow_redirects=False)
        assert resp.status == 401
        assert resp.content_type == "text/html"
        page = await resp.text()
        assert "Incorrect username, email or password" in page
        assert f'name="client_id" value="{app["client_id"]}"' in page
    assert await pool.fetchval("SELECT count(*) FROM oauth_codes") == 0
    # Another user may authorize the app for their own account.
    status, params = await authorize(api, consent_form(app, handle="bob@example.com"))
    assert status == 303
    token = (await (await exchange(api, app, params["code"][0])).json())["access_token"]
    assert (await (await api.get("/api/user", headers=bearer(token))).json())["username"] == "bob"


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_authorize_parameter_errors(api: TestClient, app: dict[str, Any], method: str):
    cid = app["client_id"]
    cases = [
        ({"scope": SCOPE}, 400, {"message": "No client ID in request"}),
        ({"client_id": "", "scope": SCOPE}, 400, {"message": "No client ID in request"}),
        ({"client_id": "f" * 32, "scope": SCOPE}, 404, {"message": "Not Found"}),
        ({"client_id": cid, "scope": SCOPE, "redirect_uri": REDIRECT + "/x"}, 400,
         {"message": "redirect_uri does not match"}),
        ({"client_id": cid, "scope": "bogus:read"}, 400,
         {"message": "Invalid scope: unknown resource: bogus"}),
        ({"client_id": cid, "scope": 'build:"x'}, 400,
         {"message": 'Invalid scope: unknown permission: "x'}),
        ({"client_id": cid, "scope": "  "}, 400, {"message": "No scope requested"}),
        ({"client_id": cid}, 400, {"message": "No scope requested"}),
    ]  # fmt: skip
    for params, status, body in cases:
        if method == "GET":
            resp = await api.get("/login/oauth/authorize", params=params)
        else:
            form = {**params, "handle": "alice", "password": "password1", "authorize": "true"}
            resp = await api.post("/login/oauth/authorize", data=form, allow_redirects=False)
        assert resp.status == status, params
        assert await resp.json() == body, params
    resp = await api.get(
        "/login/oauth/authorize",
        params={"client_id": cid, "scope": SCOPE, "redirect_uri": REDIRECT},
    )
    assert resp.status == 200


async def test_revoke_deletes_the_token_in_use(api: TestClient, app: dict[str, Any]):
    token = (await (await exchange(api, app, await code_for(api, app))).json())["access_token"]
    resp = await api.post("/logout/oauth/revoke", headers=bearer(token))
    assert resp.status == 204
    assert (await api.get("/api/builds", headers=bearer(token))).status == 404
    assert await (await api.get("/api/tokens", headers=basic())).json() == []
    for headers in (bearer(token), bearer("mrd_" + "0" * 64), {}):
        assert (await api.post("/logout/oauth/revoke", headers=headers)).status == 204


async def test_deleting_an_app_removes_its_tokens_and_codes(
    api: TestClient, app: dict[str, Any], pool: asyncpg.Pool
):
    token = (await (await exchange(api, app, await code_for(api, app))).json())["access_token"]
    pending = await code_for(api, app)
    resp = await api.delete(f"/api/apps/{app['client_id']}", headers=basic())
    assert resp.status == 204
    assert (await api.get("/api/builds", headers=bearer(token))).status == 404
    assert await pool.fetchval("SELECT count(*) FROM oauth_codes") == 0
    assert await pool.fetchval("SELECT count(*) FROM tokens") == 0
    resp = await exchange(api, app, pending)
    assert resp.status == 401


async def test_secrets_never_reach_the_log(
    api: TestClient, app: dict[str, Any], caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    code = await code_for(api, app)
    token = (await (await exchange(api, app, code)).json())["access_token"]
    await exchange(api, app, code)  # a refused replay
    await api.get("/api/builds", headers=bearer(token))
    await api.post("/logout/oauth/revoke", headers=bearer(token))
    text = caplog.text
    assert "Issue token" in text  # authlib's own debug lines were captured ...
    for secret in (app["client_secret"], code, token, token[4:]):
        assert secret not in text  # ... and none holds a secret


async def test_a_personal_token_may_share_its_name_with_an_app(
    api: TestClient, app: dict[str, Any]
):
    assert (await exchange(api, app, await code_for(api, app))).status == 200
    resp = await api.post("/api/tokens", headers=basic(), json={"name": app["name"]})
    assert resp.status == 201
    listed = await (await api.get("/api/tokens", headers=basic())).json()
    assert [(t["name"], t["app"] is None) for t in listed] == [(app["name"], False),
                                                              (app["name"], True)]  # fmt: skip


async def test_a_replayed_code_is_refused_and_revokes_the_token_issued_for_it(
    api: TestClient, app: dict[str, Any]
):
    code = await code_for(api, app)
    token = (await (await exchange(api, app, code)).json())["access_token"]
    assert (await api.get("/api/builds", headers=bearer(token))).status == 200
    resp = await exchange(api, app, code)  # RFC 6749 §4.1.2
    assert resp.status == 400
    assert await resp.json() == BAD_CODE
    assert (await api.get("/api/builds", headers=bearer(token))).status == 404
    assert await (await api.get("/api/tokens", headers=basic())).json() == []
    # Only that code's token: a later one (same user and app) survives a replay of the old code.
    newer = (await (await exchange(api, app, await code_for(api, app))).json())["access_token"]
    assert (await exchange(api, app, code)).status == 400
    assert (await api.get("/api/builds", headers=bearer(newer))).status == 200


async def test_a_replay_by_another_app_or_with_a_bad_secret_revokes_nothing(
    api: TestClient, app: dict[str, Any]
):
    code = await code_for(api, app)
    token = (await (await exchange(api, app, code)).json())["access_token"]
    other = await register(api, "other")
    assert (await exchange(api, other, code)).status == 400
    assert (await exchange(api, {**app, "client_secret": "wrong"}, code)).status == 401
    assert (await api.get("/api/builds", headers=bearer(token))).status == 200


async def test_deleting_an_app_revokes_tokens_minted_with_its_tokens(
    api: TestClient, app: dict[str, Any]
):
    scope = "token:write build:read"
    token = (await (await exchange(api, app, await code_for(api, app, scope))).json())[
        "access_token"
    ]
    minted = []
    for name, using in (("child", token), ("grandchild", None)):
        resp = await api.post(
            "/api/tokens",
            headers=bearer(using or minted[-1]),
            json={"name": name, "scope": scope},
        )
        assert resp.status == 201, await resp.text()
        minted.append((await resp.json())["token"])
    resp = await api.post("/api/tokens", headers=basic(), json={"name": "own", "scope": scope})
    own = (await resp.json())["token"]
    resp = await api.delete(f"/api/apps/{app['client_id']}", headers=basic())
    assert resp.status == 204
    for value in (token, *minted):
        assert (await api.get("/api/builds", headers=bearer(value))).status == 404
    assert (await api.get("/api/builds", headers=bearer(own))).status == 200
    listed = await (await api.get("/api/tokens", headers=basic())).json()
    assert [t["name"] for t in listed] == ["own"]


async def test_an_app_registered_with_a_now_refused_redirect_uri_gets_no_code(
    api: TestClient, app: dict[str, Any], pool: asyncpg.Pool
):
    await pool.execute("UPDATE apps SET redirect_uri = 'javascript:alert(1)'")
    resp = await api.post("/login/oauth/authorize", data=consent_form(app), allow_redirects=False)
    assert resp.status == 400
    assert await resp.json() == {"message": "Registered redirect_uri is not allowed"}


def session(api: TestClient, app: dict[str, Any], secret: str | None = None) -> OAuth2Session:
    """authlib's own OAuth 2 client (client_secret_basic), talking to the live test server."""
    client = OAuth2Session(app["client_id"], secret or app["client_secret"])
    client.trust_env = False  # loopback only, whatever proxy the environment names
    return client


async def test_authlib_client_reads_rfc_6749_errors_and_tokens(
    api: TestClient, app: dict[str, Any]
):
    url = str(api.make_url("/login/oauth/token"))
    code = await code_for(api, app)
    with pytest.raises(OAuthError) as bad_code:
        await asyncio.to_thread(session(api, app).fetch_token, url, code="nope")
    assert (bad_code.value.error, bad_code.value.description) == (
        "invalid_grant",
        "Invalid or expired code",
    )
    with pytest.raises(OAuthError) as bad_client:
        await asyncio.to_thread(session(api, app, "0" * 64).fetch_token, url, code=code)
    assert bad_client.value.error == "invalid_client"
    with pytest.raises(OAuthError) as wrong_grant:
        await asyncio.to_thread(
            session(api, app).fetch_token, url, grant_type="password", username="a", password="b"
        )
    assert wrong_grant.value.error == "unsupported_grant_type"
    token = await asyncio.to_thread(session(api, app).fetch_token, url, code=code)
    assert (token["token_type"], token["scope"]) == ("bearer", "build:read namespace:read")
    assert (await api.get("/api/builds", headers=bearer(token["access_token"]))).status == 200


async def test_rfc_7009_revoke_with_authlib_revokes_the_named_token(
    api: TestClient, app: dict[str, Any]
):
    token = await asyncio.to_thread(
        session(api, app).fetch_token,
        str(api.make_url("/login/oauth/token")),
        code=await code_for(api, app),
    )
    url = str(api.make_url("/logout/oauth/revoke"))
    value = token["access_token"]
    # Wrong client credentials: refused (RFC 7009 §2.2.1), the token keeps working.
    resp = await asyncio.to_thread(session(api, app, "0" * 64).revoke_token, url, value)
    assert (resp.status_code, resp.json()) == (401, BAD_CLIENT)
    assert (await api.get("/api/builds", headers=bearer(value))).status == 200
    resp = await asyncio.to_thread(
        session(api, app).revoke_token, url, value, token_type_hint="access_token"
    )
    assert resp.status_code == 200
    assert (await api.get("/api/builds", headers=bearer(value))).status == 404
    # An unknown (or already revoked) token is answered 200 as well (RFC 7009 §2.2).
    resp = await asyncio.to_thread(session(api, app).revoke_token, url, value)
    assert resp.status_code == 200
