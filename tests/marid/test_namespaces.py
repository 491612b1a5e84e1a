"""`path[@owner]` references (docs/api.md §3.4), resolved against a real database."""

import asyncpg
import pytest

from marid import namespaces
from marid.users import User
from marid.validation import Errors
from tests.conftest import MakeUser


async def resolve(pool: asyncpg.Pool, user: User, ref: str, manifest: bool = False):
    errors = Errors()
    async with pool.acquire() as conn, conn.transaction():
        ns = await namespaces.resolve(conn, user, ref, errors, key="k", manifest=manifest)
    return ns, errors.by_field


async def test_missing_namespaces_are_created_along_the_path(pool: asyncpg.Pool, alice: User):
    ns, errors = await resolve(pool, alice, "acme/web/api")
    assert errors == {}
    assert ns is not None and ns.path == "acme/web/api" and ns.user_id == alice.id
    rows = await pool.fetch("SELECT path, visibility, description FROM namespaces ORDER BY path")
    assert [tuple(r) for r in rows] == [
        ("acme", "private", ""), ("acme/web", "private", ""), ("acme/web/api", "private", "")
    ]  # fmt: skip
    again, _ = await resolve(pool, alice, "acme/web/api@alice")
    assert again is not None and again.id == ns.id


async def test_new_children_inherit_visibility(pool: asyncpg.Pool, alice: User):
    await resolve(pool, alice, "acme")
    await pool.execute("UPDATE namespaces SET visibility = 'public'")
    child, _ = await resolve(pool, alice, "acme/new")
    assert child is not None and child.visibility == "public"


async def test_other_owner_needs_collaboration_on_an_existing_root(
    pool: asyncpg.Pool, alice: User, make_user: MakeUser
):
    bob = await make_user("bob")
    for ref in ("team@bob", "team@ghost", "team@"):
        ns, errors = await resolve(pool, alice, ref)
        assert ns is None and errors == {"k": ["Namespace permission denied"]}, ref
    root, _ = await resolve(pool, bob, "team")
    assert root is not None
    await pool.execute("INSERT INTO namespace_collaborators VALUES ($1, $2)", root.id, alice.id)
    ns, errors = await resolve(pool, alice, "team/alices@bob")
    assert errors == {}
    assert ns is not None and ns.user_id == bob.id and ns.root_id == root.id
    _, manifest_errors = await resolve(pool, bob, "x@ghost", manifest=True)
    assert manifest_errors == {"k": ["Manifest cannot submit to namespace"]}


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("a b", "name can only contain letters and numbers"),
        ("a//b", "name can only contain letters and numbers"),
        ("a/" + "x" * 33, "name cannot be longer than 32 characters"),
        ("/".join(["a"] * 21), "cannot exceed depth of 20"),
    ],
)
async def test_syntax_errors(pool: asyncpg.Pool, alice: User, ref: str, message: str):
    _, errors = await resolve(pool, alice, ref)
    assert errors == {"k": [f"Namespace {message}"]}
    _, errors = await resolve(pool, alice, ref, manifest=True)
    assert errors == {"k": [f"Manifest namespace {message}"]}
    assert await pool.fetchval("SELECT count(*) FROM namespaces") == 0
