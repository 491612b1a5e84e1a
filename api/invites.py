"""Invites to a namespace tree (docs/api.md §8.11, §8.12, §9)."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from marid import invites, namespaces, users, webhooks
from marid.api.auth import requires
from marid.api.http import api_url, path_id, read_body
from marid.api.keys import POOL
from marid.api.namespaces import NS, NS_PARAMS, load_namespace
from marid.api.openapi import (
    BEARER,
    INVALID,
    NOT_FOUND,
    STRING,
    Operations,
    json_response,
    list_of,
    obj,
    op,
    path_param,
    ref,
)
from marid.namespaces import Namespace
from marid.users import User
from marid.validation import NotFound

routes = web.RouteTableDef()


@routes.get(NS + "/-/invites")
@requires("invite:read")
async def list_namespace_invites(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        ns = await load_namespace(conn, request)
        if not (await namespaces.rights(conn, user, ns)).admin:
            raise NotFound()
        found = await invites.list_for_root(conn, ns)
        return web.json_response(await invites.to_json(conn, found, api_url(request)))


@routes.post(NS + "/-/invites")
@requires("invite:write")
async def create_invite(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        ns = await load_namespace(conn, request)
        if not (await namespaces.rights(conn, user, ns)).admin:
            raise NotFound()
        body = await read_body(request)
        handle = body.required_string(
            "handle", "Username or email", "Username or email field required"
        )
        body.errors.raise_if_any()
        assert handle is not None
        created = await send(conn, request, ns, user, handle)
    return web.json_response(created, status=201)


async def send(
    conn: asyncpg.Connection, request: web.Request, ns: Namespace, user: User, handle: str
) -> dict[str, Any]:
    """Invite `handle` to the tree of `ns` (its admin `user` checked by the caller), with the
    invite.sent webhook; the Invite entity. Raises ValidationError as invites.send does."""
    invite = await invites.send(conn, ns, user, handle)
    [created] = await invites.to_json(conn, [invite], api_url(request))
    sent = {key: created[key] for key in ("invitee", "inviter", "namespace")}
    await webhooks.emit(conn, invite.namespace_id, "invite.sent", sent)
    return created


@routes.get("/invites")
@requires("invite:read")
async def list_invites(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        found = await invites.list_for_invitee(conn, user)
        return web.json_response(await invites.to_json(conn, found, api_url(request)))


@routes.patch(r"/invites/{id:\d+}")
@requires("invite:write")
async def accept_invite(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        body = await accept(conn, request, user)
    return web.json_response(body)


async def accept(conn: asyncpg.Connection, request: web.Request, user: User) -> dict[str, Any]:
    """Accept the invite of the URL, sent to `user` (NotFound otherwise), with the
    invite.accepted webhook."""
    invite = await invites.get(conn, path_id(request))
    if invite is None or invite.invitee_id != user.id:
        raise NotFound()
    await invites.accept(conn, invite)
    inviter = (await users.by_ids(conn, {invite.inviter_id}))[invite.inviter_id]
    root = await namespaces.get(conn, invite.namespace_id)
    assert root is not None
    invitee, space = users.to_json(user), namespaces.to_json(root, api_url(request))
    accepted = {"invitee": invitee, "namespace": space}
    await webhooks.emit(conn, root.id, "invite.accepted", accepted)
    return {"invitee": invitee, "inviter": users.to_json(inviter), "namespace": space}


@routes.delete(r"/invites/{id:\d+}")
@requires("invite:delete")
async def delete_invite(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        await withdraw_or_reject(conn, request, user)
    return web.Response(status=204)


async def withdraw_or_reject(conn: asyncpg.Connection, request: web.Request, user: User) -> None:
    """Delete the invite of the URL: its invitee rejects it (invite.rejected), its inviter
    withdraws it; NotFound for anybody else."""
    invite = await invites.get(conn, path_id(request))
    if invite is None or user.id not in (invite.invitee_id, invite.inviter_id):
        raise NotFound()
    await invites.delete(conn, invite)
    if user.id == invite.invitee_id:  # rejected; the inviter withdrawing it is no event
        root = await namespaces.get(conn, invite.namespace_id)
        assert root is not None
        rejected = {
            "invitee": users.to_json(user),
            "namespace": namespaces.to_json(root, api_url(request)),
        }
        await webhooks.emit(conn, root.id, "invite.rejected", rejected)


ID = [path_param("id", "invite id")]
SCHEMAS = {
    "Invite": obj(
        {
            "id": {"type": "integer"},
            "namespace_id": {"type": "integer"},
            "invitee_id": {"type": "integer"},
            "inviter_id": {"type": "integer"},
            "url": {"type": "string", "format": "uri"},
            "invitee": ref("User"),
            "inviter": ref("User"),
            "namespace": ref("Namespace"),
        }
    ),
    "AcceptedInvite": obj(
        {"invitee": ref("User"), "inviter": ref("User"), "namespace": ref("Namespace")}
    ),
    "InviteRequest": obj({"handle": STRING}),
}
OPERATIONS: Operations = {
    ("get", "/n/{username}/{path}/-/invites"): op(
        "Pending invites of the tree (invite:read; owner only)",
        {"200": json_response("OK", list_of("Invite")), **NOT_FOUND},
        security=BEARER,
        parameters=NS_PARAMS,
    ),
    ("post", "/n/{username}/{path}/-/invites"): op(
        "Invite a user to the tree (invite:write; owner only)",
        {"201": json_response("Created", ref("Invite")), **INVALID, **NOT_FOUND},
        security=BEARER,
        parameters=NS_PARAMS,
        body=ref("InviteRequest"),
    ),
    ("get", "/invites"): op(
        "Invites addressed to the caller (invite:read)",
        {"200": json_response("OK", list_of("Invite")), **NOT_FOUND},
        security=BEARER,
    ),
    ("patch", "/invites/{id}"): op(
        "Accept an invite (invite:write; invitee only)",
        {"200": json_response("OK", ref("AcceptedInvite")), **NOT_FOUND},
        security=BEARER,
        parameters=ID,
    ),
    ("delete", "/invites/{id}"): op(
        "Reject or withdraw an invite (invite:delete; invitee or inviter)",
        {"204": {"description": "Deleted"}, **NOT_FOUND},
        security=BEARER,
        parameters=ID,
    ),
}
