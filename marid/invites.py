"""Invites and collaborators of a namespace tree (docs/api.md §8.9 to §8.12, §9).

Both are stored against the tree's root: a collaborator of the root may use every
namespace of the tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from marid import namespaces, users
from marid.namespaces import Namespace
from marid.times import rfc3339
from marid.users import User
from marid.validation import RequestError


@dataclass(frozen=True)
class Invite:
    id: int
    namespace_id: int
    invitee_id: int
    inviter_id: int
    created_at: datetime


@dataclass(frozen=True)
class Collaborator:
    user: User
    joined_at: datetime


async def get(conn: asyncpg.Connection, invite_id: int) -> Invite | None:
    row = await conn.fetchrow(
        "SELECT id, namespace_id, invitee_id, inviter_id, created_at FROM invites WHERE id = $1",
        invite_id,
    )
    return Invite(**row) if row else None


async def list_for_root(conn: asyncpg.Connection, root: Namespace) -> list[Invite]:
    """Pending invites of a tree, oldest first."""
    rows = await conn.fetch(
        """
        SELECT id, namespace_id, invitee_id, inviter_id, created_at FROM invites
        WHERE namespace_id = $1 ORDER BY created_at, id
        """,
        root.root_id,
    )
    return [Invite(**row) for row in rows]


async def list_for_invitee(conn: asyncpg.Connection, user: User) -> list[Invite]:
    """Pending invites addressed to `user`, oldest first."""
    rows = await conn.fetch(
        """
        SELECT id, namespace_id, invitee_id, inviter_id, created_at FROM invites
        WHERE invitee_id = $1 ORDER BY created_at, id
        """,
        user.id,
    )
    return [Invite(**row) for row in rows]


async def send(conn: asyncpg.Connection, ns: Namespace, inviter: User, handle: str) -> Invite:
    """Invite `handle` to the tree of `ns`; raises RequestError with docs/api.md §8.12's
    messages."""
    invitee = await users.get_by_handle(conn, handle)
    if invitee is None:
        raise RequestError("No such user")
    if invitee.id == inviter.id:
        raise RequestError("Cannot invite self")
    pending = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM invites WHERE namespace_id = $1 AND invitee_id = $2)",
        ns.root_id,
        invitee.id,
    )
    if pending:
        raise RequestError("Invite already sent")
    if await namespaces.is_member(conn, ns, invitee):
        raise RequestError("Already a collaborator")
    row = await conn.fetchrow(
        """
        INSERT INTO invites (namespace_id, invitee_id, inviter_id) VALUES ($1, $2, $3)
        ON CONFLICT ON CONSTRAINT invites_namespace_id_invitee_id_key DO NOTHING
        RETURNING id, namespace_id, invitee_id, inviter_id, created_at
        """,
        ns.root_id,
        invitee.id,
        inviter.id,
    )
    if row is None:  # a concurrent request sent the same invite
        raise RequestError("Invite already sent")
    return Invite(**row)


async def accept(conn: asyncpg.Connection, invite: Invite) -> None:
    """Make the invitee a collaborator of the tree and consume the invite."""
    await conn.execute(
        """
        INSERT INTO namespace_collaborators (namespace_id, user_id) VALUES ($1, $2)
        ON CONFLICT DO NOTHING
        """,
        invite.namespace_id,
        invite.invitee_id,
    )
    await conn.execute("DELETE FROM invites WHERE id = $1", invite.id)


async def delete(conn: asyncpg.Connection, invite: Invite) -> None:
    await conn.execute("DELETE FROM invites WHERE id = $1", invite.id)


async def to_json(
    conn: asyncpg.Connection, found: list[Invite], api_url: str
) -> list[dict[str, Any]]:
    """Invite entities (docs/api.md §9.1) with their users and root namespaces embedded."""
    people = await users.by_ids(conn, {i.invitee_id for i in found} | {i.inviter_id for i in found})
    roots = await namespaces.by_ids(conn, {i.namespace_id for i in found})
    return [
        {
            "id": invite.id,
            "namespace_id": invite.namespace_id,
            "invitee_id": invite.invitee_id,
            "inviter_id": invite.inviter_id,
            "url": f"{api_url}/invites/{invite.id}",
            "invitee": users.to_json(people[invite.invitee_id]),
            "inviter": users.to_json(people[invite.inviter_id]),
            "namespace": namespaces.to_json(roots[invite.namespace_id], api_url),
        }
        for invite in found
    ]


async def collaborators(conn: asyncpg.Connection, ns: Namespace) -> list[Collaborator]:
    """Collaborators of the tree of `ns`, in the order they joined."""
    rows = await conn.fetch(
        """
        SELECT u.id, u.username, u.email, u.created_at, c.created_at AS joined_at
        FROM namespace_collaborators c JOIN users u ON u.id = c.user_id
        WHERE c.namespace_id = $1 ORDER BY c.created_at, u.id
        """,
        ns.root_id,
    )
    return [
        Collaborator(
            User(row["id"], row["username"], row["email"], row["created_at"]), row["joined_at"]
        )
        for row in rows
    ]


def collaborator_json(collaborator: Collaborator, ns: Namespace, api_url: str) -> dict[str, Any]:
    """The Collaborator entity of docs/api.md §8.1."""
    user = collaborator.user
    return {
        "id": user.id,
        "email": user.email,
        "username": user.username,
        "created_at": rfc3339(collaborator.joined_at),
        "url": f"{ns.url(api_url)}/-/collaborators/{user.username}",
    }


async def remove_collaborator(conn: asyncpg.Connection, ns: Namespace, handle: str) -> None:
    """Remove `handle` from the tree; raises RequestError when they do not collaborate."""
    removed = await conn.fetchval(
        """
        DELETE FROM namespace_collaborators c USING users u
        WHERE c.namespace_id = $1 AND c.user_id = u.id AND (u.username = $2 OR u.email = $2)
        RETURNING c.user_id
        """,
        ns.root_id,
        handle,
    )
    if removed is None:
        raise RequestError("No such collaborator")
