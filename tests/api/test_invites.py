"""Invites (docs/api.md §8.11, §8.12, §9)."""

import asyncpg
from aiohttp.test_utils import TestClient

from marid.users import User
from tests.api.helpers import BASE, create_namespace, user_json
from tests.conftest import MakeToken, MakeUser, bearer

OWNER_SCOPE = "namespace:read,write invite:read,write,delete"


async def setup_team(api: TestClient, token: MakeToken, make_user: MakeUser):
    bob = await make_user("bob")
    owner = await token(OWNER_SCOPE)
    await create_namespace(api, owner, "team")
    await create_namespace(api, owner, "sub", parent="team")
    return bob, owner, await token("invite:read,write,delete namespace:read", user=bob)


async def test_send_list_and_accept(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken
):
    bob, owner, bob_token = await setup_team(api, token, make_user)
    resp = await api.post(
        "/api/n/alice/team/sub/-/invites", headers=bearer(owner), json={"handle": "bob"}
    )
    assert resp.status == 201
    invite = await resp.json()
    root = await (await api.get("/api/n/alice/team", headers=bearer(owner))).json()
    root["parent"] = None
    assert invite == {
        "id": invite["id"],
        "namespace_id": root["id"],  # stored against the root
        "invitee_id": bob.id,
        "inviter_id": alice.id,
        "url": f"{BASE}/invites/{invite['id']}",
        "invitee": user_json(bob),
        "inviter": user_json(alice),
        "namespace": root,
    }
    assert await (await api.get("/api/n/alice/team/-/invites", headers=bearer(owner))).json() == [
        invite
    ]
    assert await (await api.get("/api/invites", headers=bearer(bob_token))).json() == [invite]
    assert await (await api.get("/api/invites", headers=bearer(owner))).json() == []
    # Only the invitee may accept.
    assert (await api.patch(f"/api/invites/{invite['id']}", headers=bearer(owner))).status == 404
    resp = await api.patch(f"/api/invites/{invite['id']}", headers=bearer(bob_token))
    assert resp.status == 200
    assert await resp.json() == {
        "invitee": user_json(bob),
        "inviter": user_json(alice),
        "namespace": root,
    }
    assert await (await api.get("/api/invites", headers=bearer(bob_token))).json() == []
    assert (await api.get("/api/n/alice/team/sub", headers=bearer(bob_token))).status == 200


async def test_invite_failures_in_order(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken, pool: asyncpg.Pool
):
    _bob, owner, bob_token = await setup_team(api, token, make_user)

    async def invite(body: object) -> tuple[int, object]:
        resp = await api.post("/api/n/alice/team/-/invites", headers=bearer(owner), json=body)
        return resp.status, await resp.json()

    assert await invite({}) == (400, {"handle": ["Username or email field required"]})
    assert await invite({"handle": 7}) == (400, {"handle": ["Username or email must be a string"]})
    assert await invite({"handle": "ghost"}) == (400, {"message": "No such user"})
    assert await invite({"handle": "alice@example.com"}) == (400, {"message": "Cannot invite self"})
    assert (await invite({"handle": "bob@example.com"}))[0] == 201
    assert await invite({"handle": "bob"}) == (400, {"message": "Invite already sent"})
    [pending] = await (await api.get("/api/invites", headers=bearer(bob_token))).json()
    await api.patch(f"/api/invites/{pending['id']}", headers=bearer(bob_token))
    assert await invite({"handle": "bob"}) == (400, {"message": "Already a collaborator"})
    assert await pool.fetchval("SELECT count(*) FROM invites") == 0


async def test_only_the_namespace_owner_invites(
    api: TestClient, make_user: MakeUser, token: MakeToken
):
    _bob, _owner, bob_token = await setup_team(api, token, make_user)
    await make_user("carol")
    resp = await api.post(
        "/api/n/alice/team/-/invites", headers=bearer(bob_token), json={"handle": "carol"}
    )
    assert resp.status == 404
    assert (await api.get("/api/n/alice/team/-/invites", headers=bearer(bob_token))).status == 404


async def test_reject_by_invitee_and_withdraw_by_inviter(
    api: TestClient, make_user: MakeUser, token: MakeToken
):
    _bob, owner, bob_token = await setup_team(api, token, make_user)
    carol = await make_user("carol")
    carol_token = await token("invite:read,delete", user=carol)
    ids = []
    for handle in ("bob", "carol"):
        resp = await api.post(
            "/api/n/alice/team/-/invites", headers=bearer(owner), json={"handle": handle}
        )
        ids.append((await resp.json())["id"])
    # A third party cannot touch someone else's invite.
    assert (await api.delete(f"/api/invites/{ids[0]}", headers=bearer(carol_token))).status == 404
    assert (await api.delete(f"/api/invites/{ids[0]}", headers=bearer(bob_token))).status == 204
    assert (await api.delete(f"/api/invites/{ids[1]}", headers=bearer(owner))).status == 204
    assert await (await api.get("/api/n/alice/team/-/invites", headers=bearer(owner))).json() == []
    assert (await api.get("/api/n/alice/team", headers=bearer(bob_token))).status == 404
