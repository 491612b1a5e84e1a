"""Namespaces: the tree model, access rights and `path[@owner]` references (docs/api.md §3, §8)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from marid import users
from marid.times import rfc3339
from marid.users import User
from marid.validation import Body, Errors, ValidationError

SEGMENT = re.compile(r"[A-Za-z0-9]+")
MAX_DEPTH = 20
MAX_RUNNING = 10000  # the largest `max_running` (namespaces_max_running_check, migration 0020)
MAX_SEGMENT = 32
VISIBILITIES = ("private", "internal", "public")
LINKS = (
    "builds",
    "namespaces",
    "images",
    "objects",
    "variables",
    "keys",
    "invites",
    "collaborators",
    "webhooks",
)


@dataclass(frozen=True)
class Namespace:
    id: int
    user_id: int
    root_id: int
    parent_id: int | None
    name: str
    path: str
    description: str
    visibility: str
    created_at: datetime
    owner: User
    # How many of its builds may run at once (docs/api.md §8.1); None: no limit of its own.
    max_running: int | None = None

    @property
    def depth(self) -> int:
        return self.path.count("/") + 1

    def url(self, api_url: str) -> str:
        return f"{api_url}/n/{self.owner.username}/{self.path}"


@dataclass(frozen=True)
class Rights:
    """What a caller may do with a namespace or a resource (docs/api.md §3.2)."""

    see: bool
    use: bool
    admin: bool
    public: bool  # read scopes are waived (§2.4)


NONE = Rights(False, False, False, False)


def from_row(row: asyncpg.Record) -> Namespace:
    owner = User(row["user_id"], row["owner_username"], row["owner_email"], row["owner_created_at"])
    return Namespace(
        row["id"],
        row["user_id"],
        row["root_id"],
        row["parent_id"],
        row["name"],
        row["path"],
        row["description"],
        row["visibility"],
        row["created_at"],
        owner,
        row["max_running"],
    )


def to_json(
    ns: Namespace,
    api_url: str,
    parent: dict[str, Any] | None = None,
    build: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Namespace entity of docs/api.md §8.1; `parent` and `build` are embedded when given."""
    url = ns.url(api_url)
    return {
        "id": ns.id,
        "user_id": ns.user_id,
        "root_id": ns.root_id,
        "parent_id": ns.parent_id,
        "name": ns.name,
        "path": ns.path,
        "description": ns.description,
        "visibility": ns.visibility,
        "max_running": ns.max_running,
        "created_at": rfc3339(ns.created_at),
        "url": url,
        **{f"{link}_url": f"{url}/-/{link}" for link in LINKS},
        "user": users.to_json(ns.owner),
        "parent": parent,
        "build": build,
    }


async def get(conn: asyncpg.Connection, namespace_id: int) -> Namespace | None:
    row = await conn.fetchrow("SELECT * FROM namespaces_with_owner WHERE id = $1", namespace_id)
    return from_row(row) if row else None


async def by_ids(conn: asyncpg.Connection, ids: set[int]) -> dict[int, Namespace]:
    """Namespaces by id, for embedding in listings."""
    rows = await conn.fetch("SELECT * FROM namespaces_with_owner WHERE id = ANY($1)", list(ids))
    return {row["id"]: from_row(row) for row in rows}


async def get_by_path(conn: asyncpg.Connection, username: str, path: str) -> Namespace | None:
    row = await conn.fetchrow(
        "SELECT * FROM namespaces_with_owner WHERE owner_username = $1 AND path = $2",
        username,
        path,
    )
    return from_row(row) if row else None


async def is_member(conn: asyncpg.Connection, ns: Namespace, user: User) -> bool:
    """True when `user` owns the namespace's tree or collaborates on it."""
    if user.id == ns.user_id:
        return True
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM namespace_collaborators"
            " WHERE namespace_id = $1 AND user_id = $2)",
            ns.root_id,
            user.id,
        )
    )


async def rights(conn: asyncpg.Connection, user: User | None, ns: Namespace) -> Rights:
    """The caller's rights on a namespace and everything in it."""
    member = user is not None and await is_member(conn, ns, user)
    see = member or ns.visibility == "public" or (ns.visibility == "internal" and user is not None)
    return Rights(
        see=see,
        use=member,
        admin=user is not None and user.id == ns.user_id,
        public=ns.visibility == "public",
    )


async def resource_rights(
    conn: asyncpg.Connection, user: User | None, owner_id: int, ns: Namespace | None
) -> Rights:
    """Rights on a resource owned by `owner_id`, in `ns` or (None) in no namespace."""
    if ns is not None:
        found = await rights(conn, user, ns)
        return Rights(found.see, found.use, found.use, found.public)
    mine = user is not None and user.id == owner_id
    return Rights(mine, mine, mine, False)


def check_path(path: str) -> list[str]:
    """Syntax problems of a namespace path (docs/api.md §3.4 rule 1) as message reasons."""
    segments = path.split("/")
    problems = []
    if any(not SEGMENT.fullmatch(segment) for segment in segments):
        problems.append("name can only contain letters and numbers")
    if any(len(segment) > MAX_SEGMENT for segment in segments):
        problems.append(f"name cannot be longer than {MAX_SEGMENT} characters")
    if len(segments) > MAX_DEPTH:
        problems.append(f"cannot exceed depth of {MAX_DEPTH}")
    return problems


async def resolve(
    conn: asyncpg.Connection,
    user: User,
    reference: str | None,
    errors: Errors,
    key: str = "namespace",
    manifest: bool = False,
) -> Namespace | None:
    """Resolve a `path[@owner]` reference (docs/api.md §3.4), creating missing namespaces.

    Failures are added to `errors` under `key` (manifest wording when `manifest`); the caller
    owns the transaction, so namespaces created for a request that then fails are rolled back.
    """
    if not reference:
        return None
    label = "Manifest namespace" if manifest else "Namespace"
    denied = "Manifest cannot submit to namespace" if manifest else "Namespace permission denied"
    path, at, owner_name = reference.partition("@")
    problems = check_path(path)
    if problems:
        for problem in problems:
            errors.add(key, f"{label} {problem}")
        return None
    owner: User | None = user
    if at and owner_name != user.username:
        owner = await users.get_by_username(conn, owner_name)
        root = await get_by_path(conn, owner.username, path.split("/")[0]) if owner else None
        if root is None or not await is_member(conn, root, user):
            errors.add(key, denied)
            return None
    assert owner is not None
    return await _ensure_path(conn, owner, path)


async def _ensure_path(conn: asyncpg.Connection, owner: User, path: str) -> Namespace:
    """The owner's namespace at `path`, creating missing ones along it (private roots,
    children inheriting their parent's visibility)."""
    parent: Namespace | None = None
    segments = path.split("/")
    for depth in range(1, len(segments) + 1):
        prefix = "/".join(segments[:depth])
        found = await get_by_path(conn, owner.username, prefix)
        if found is None:
            await conn.execute(
                """
                WITH next AS (SELECT nextval('namespaces_id_seq') AS id)
                INSERT INTO namespaces (id, user_id, root_id, parent_id, name, path, visibility)
                SELECT next.id, $1, coalesce($2, next.id), $3, $4, $5, $6 FROM next
                ON CONFLICT ON CONSTRAINT namespaces_user_id_path_key DO NOTHING
                """,
                owner.id,
                parent.root_id if parent else None,
                parent.id if parent else None,
                segments[depth - 1],
                prefix,
                parent.visibility if parent else "private",
            )
            found = await get_by_path(conn, owner.username, prefix)
            assert found is not None
        parent = found
    assert parent is not None
    return parent


@dataclass(frozen=True)
class NamespaceForm:
    name: str
    parent: str | None
    description: str
    visibility: str
    max_running: int | None = None

    @classmethod
    def parse(cls, body: Body) -> NamespaceForm:
        """Shape checks of POST /namespaces (docs/api.md §8.3); raises ValidationError."""
        name = body.required_string("name", "Name")
        if name is not None:
            if not 3 <= len(name) <= 32:
                body.errors.add("name", "Name must be between 3 and 32 characters in length")
            if not SEGMENT.fullmatch(name):
                body.errors.add("name", "Name can only have letters, and numbers")
        parent = body.string("parent", "Parent")
        description = check_description(body)
        visibility = check_visibility(body)
        _, max_running = check_max_running(body)
        body.errors.raise_if_any()
        assert name is not None
        return cls(name, parent or None, description or "", visibility or "private", max_running)


def check_description(body: Body) -> str | None:
    description = body.string("description", "Description")
    if description is not None and len(description) > 255:
        body.errors.add("description", "Description cannot be longer than 255 characters in length")
    return description


def check_max_running(body: Body) -> tuple[bool, int | None]:
    """`max_running` (docs/api.md §8.1): whether it was given, and its value, an integer from
    1 to MAX_RUNNING or null (no limit)."""
    if "max_running" not in body.data:
        return False, None
    value = body.data["max_running"]
    if value is None:
        return True, None
    if isinstance(value, bool) or not isinstance(value, int):
        body.errors.add("max_running", "Max running must be an integer or null")
    elif not 1 <= value <= MAX_RUNNING:
        body.errors.add("max_running", f"Max running must be between 1 and {MAX_RUNNING}")
    else:
        return True, value
    return False, None


def check_visibility(body: Body) -> str | None:
    visibility = body.string("visibility", "Visibility")
    if visibility is not None and visibility not in VISIBILITIES:
        body.errors.add("visibility", "Visibility must be one of private, internal, public")
        return None
    return visibility


async def create(conn: asyncpg.Connection, user: User, form: NamespaceForm) -> Namespace:
    """Create a namespace for `user` (docs/api.md §8.3); raises ValidationError."""
    parent = None
    if form.parent is not None:
        parent = await get_by_path(conn, user.username, form.parent)
        if parent is None:
            raise ValidationError({"parent": ["Parent does not exist"]})
        if parent.depth >= MAX_DEPTH:
            raise ValidationError({"parent": ["Parent cannot have children beyond a depth of 20"]})
    path = f"{parent.path}/{form.name}" if parent else form.name
    row = await conn.fetchrow(
        """
        WITH next AS (SELECT nextval('namespaces_id_seq') AS id)
        INSERT INTO namespaces
            (id, user_id, root_id, parent_id, name, path, description, visibility, max_running)
        SELECT next.id, $1, coalesce($2, next.id), $3, $4, $5, $6, $7, $8 FROM next
        ON CONFLICT ON CONSTRAINT namespaces_user_id_path_key DO NOTHING
        RETURNING id
        """,
        user.id,
        parent.root_id if parent else None,
        parent.id if parent else None,
        form.name,
        path,
        form.description,
        parent.visibility if parent else form.visibility,
        form.max_running,
    )
    if row is None:
        raise ValidationError({"name": ["Name already exists"]})
    created = await get(conn, row["id"])
    assert created is not None
    return created


async def update(
    conn: asyncpg.Connection,
    ns: Namespace,
    description: str | None,
    visibility: str | None,
    max_running: tuple[bool, int | None] = (False, None),
) -> Namespace:
    """Apply PATCH (docs/api.md §8.5): a root's visibility applies to its whole tree;
    `max_running` is (given, value), as `check_max_running` reads it."""
    if max_running[0]:
        await conn.execute(
            "UPDATE namespaces SET max_running = $2 WHERE id = $1", ns.id, max_running[1]
        )
    if description:
        await conn.execute(
            "UPDATE namespaces SET description = $2 WHERE id = $1", ns.id, description
        )
    if visibility and ns.parent_id is None:
        await conn.execute(
            "UPDATE namespaces SET visibility = $2 WHERE root_id = $1", ns.root_id, visibility
        )
    updated = await get(conn, ns.id)
    assert updated is not None
    return updated


async def delete(conn: asyncpg.Connection, ns: Namespace) -> None:
    """Delete the namespace and its descendants (their resources are detached by triggers)."""
    await conn.execute("DELETE FROM namespaces WHERE id = $1", ns.id)


async def count_mine(conn: asyncpg.Connection, user: User, search: str) -> int:
    """How many namespaces `user` owns or collaborates on match `search` (docs/api.md §8.2)."""
    return int(
        await conn.fetchval(
            """
            SELECT count(*) FROM namespaces n
            WHERE n.id IN (SELECT namespace_id FROM namespace_members WHERE user_id = $1)
              AND strpos(lower(n.path), lower($2)) > 0
            """,
            user.id,
            search,
        )
    )


async def list_mine(
    conn: asyncpg.Connection, user: User, search: str, offset: int, limit: int
) -> list[Namespace]:
    """One page of the namespaces `user` owns or collaborates on, ordered by path."""
    rows = await conn.fetch(
        """
        SELECT * FROM namespaces_with_owner n
        WHERE n.id IN (SELECT namespace_id FROM namespace_members WHERE user_id = $1)
          AND strpos(lower(n.path), lower($2)) > 0
        ORDER BY n.path, n.id
        OFFSET $3 LIMIT $4
        """,
        user.id,
        search,
        offset,
        limit,
    )
    return [from_row(row) for row in rows]


async def count_children(conn: asyncpg.Connection, ns: Namespace, search: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM namespaces"
            " WHERE parent_id = $1 AND strpos(lower(path), lower($2)) > 0",
            ns.id,
            search,
        )
    )


async def list_children(
    conn: asyncpg.Connection, ns: Namespace, search: str, offset: int, limit: int
) -> list[Namespace]:
    """One page of the direct children of `ns` (docs/api.md §8.8), ordered by path."""
    rows = await conn.fetch(
        """
        SELECT * FROM namespaces_with_owner
        WHERE parent_id = $1 AND strpos(lower(path), lower($2)) > 0
        ORDER BY path, id
        OFFSET $3 LIMIT $4
        """,
        ns.id,
        search,
        offset,
        limit,
    )
    return [from_row(row) for row in rows]
