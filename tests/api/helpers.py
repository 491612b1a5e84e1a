"""Small helpers shared by the API tests."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from marid.times import rfc3339
from marid.users import User
from tests.conftest import bearer

BASE = "https://ci.example.com/api"


def user_json(user: User) -> dict[str, Any]:
    return {"email": user.email, "username": user.username, "created_at": rfc3339(user.created_at)}


async def create_namespace(api: TestClient, token: str, name: str, **fields: Any) -> dict[str, Any]:
    resp = await api.post("/api/namespaces", headers=bearer(token), json={"name": name, **fields})
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


async def add_collaborator(api: TestClient, owner_token: str, path: str, owner: str,
                           invitee_token: str, handle: str) -> None:  # fmt: skip
    """Invite `handle` to owner's tree at `path` and accept, through the API."""
    resp = await api.post(
        f"/api/n/{owner}/{path}/-/invites", headers=bearer(owner_token), json={"handle": handle}
    )
    assert resp.status == 201, await resp.text()
    invite = await resp.json()
    resp = await api.patch(f"/api/invites/{invite['id']}", headers=bearer(invitee_token))
    assert resp.status == 200, await resp.text()
