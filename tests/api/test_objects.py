"""Objects (docs/api.md §14, §8.8): streamed uploads, raw downloads, access, detaching."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid import objects
from marid.api.app import create_app
from marid.config import Config
from marid.users import User
from tests.api.helpers import BASE, add_collaborator, create_namespace, user_json
from tests.conftest import MakeToken, MakeUser, bearer
from tests.fixtures.s3 import NOT_NEEDED

Client = Callable[..., Awaitable[TestClient]]
EVERYTHING = "object:read,write,delete namespace:read,write,delete invite:read,write"
TEXT = b"name,value\nalpha,1\nbeta,2\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
MIB = 1024 * 1024
NAME_RULE = "Name can only have letters, numbers, dots, dashes, and underscores"


def embedded(ns: dict[str, Any]) -> dict[str, Any]:
    """A namespace as a resource embeds it: without its own `parent` (docs/api.md §1.3)."""
    return {**ns, "parent": None, "build": None}


def expected(
    body: dict[str, Any],
    owner: User,
    name: str,
    content: bytes,
    type_: str = "text/plain; charset=utf-8",
    author: User | None = None,
    ns: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole Object entity for `body`'s id and created_at."""
    author = author or owner
    url = f"{BASE}/objects/{body['id']}"
    return {
        "id": body["id"],
        "author_id": author.id,
        "user_id": owner.id,
        "namespace_id": ns["id"] if ns else None,
        "name": name,
        "type": type_,
        "size": len(content),
        "md5": hashlib.md5(content).hexdigest(),
        "sha256": hashlib.sha256(content).hexdigest(),
        "created_at": body["created_at"],
        "url": url,
        "builds_url": f"{url}/builds",
        "author": user_json(author),
        "user": user_json(owner),
        "namespace": embedded(ns) if ns else None,
    }


def multipart(content: bytes | None, file_first: bool = True, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    if content is not None and file_first:
        form.add_field("file", io.BytesIO(content), filename="upload.bin")
    for name, value in fields.items():
        form.add_field(name, value)
    if content is not None and not file_first:
        form.add_field("file", io.BytesIO(content), filename="upload.bin")
    return form


async def upload(
    api: TestClient, token: str, content: bytes, **params: str
) -> aiohttp.ClientResponse:
    body = io.BytesIO(content)  # large bytes bodies warn, and warnings are errors
    return await api.post("/api/objects", headers=bearer(token), params=params, data=body)


async def create_object(api: TestClient, token: str, content: bytes, **params: str) -> Any:
    resp = await upload(api, token, content, **params)
    assert resp.status == 201, await resp.text()
    return await resp.json()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def blob_files(tmp_path: Path) -> Callable[[], list[str]]:
    """Everything the default `config` fixture's blob store holds."""
    return lambda: files_under(tmp_path / "blobs")


@pytest.fixture
async def storage_api(
    aiohttp_client: Client, config: Config, pool: asyncpg.Pool, storage_settings: dict[str, Any]
) -> TestClient:
    """An API client whose blob store is the parametrised backend (fs, s3)."""
    storage = config_module.from_dict({"storage": storage_settings}, optional=NOT_NEEDED).storage
    return await aiohttp_client(create_app(dataclasses.replace(config, storage=storage), pool))


async def test_raw_upload_and_download_are_byte_identical(
    storage_api: TestClient, alice: User, token: MakeToken, stored_blobs, pool: asyncpg.Pool
):
    value = await token("object:read,write")
    resp = await storage_api.post(
        "/api/objects",
        headers={**bearer(value), "Content-Type": "application/json"},  # still a raw upload
        params={"name": "data.csv"},
        data=TEXT,
    )
    assert resp.status == 201
    body = await resp.json()
    assert body["created_at"].endswith("Z")
    assert body == expected(body, alice, "data.csv", TEXT)
    assert len(stored_blobs()) == 1

    resp = await storage_api.get(
        f"/api/objects/{body['id']}",
        headers={**bearer(value), "Accept": "text/plain; charset=utf-8"},
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert resp.headers["Content-Length"] == str(len(TEXT))
    assert "X-Request-Id" in resp.headers
    assert await resp.read() == TEXT
    # Any other Accept gets the entity.
    for accept in ("text/plain", "*/*", "application/json"):
        resp = await storage_api.get(
            f"/api/objects/{body['id']}", headers={**bearer(value), "Accept": accept}
        )
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        assert await resp.json() == body


async def test_multipart_upload_with_fields_after_the_file(
    storage_api: TestClient, alice: User, token: MakeToken, stored_blobs
):
    value = await token(EVERYTHING)
    ns = await create_namespace(storage_api, value, "acme")
    resp = await storage_api.post(
        "/api/objects",
        headers=bearer(value),
        data=multipart(PNG, name="logo.png", namespace="acme"),
    )
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body == expected(body, alice, "logo.png", PNG, type_="image/png", ns=ns)
    resp = await storage_api.get(
        f"/api/objects/{body['id']}", headers={**bearer(value), "Accept": "image/png"}
    )
    assert resp.headers["Content-Type"] == "image/png"
    assert await resp.read() == PNG
    assert len(stored_blobs()) == 1


async def test_one_byte_over_the_limit_leaves_nothing_behind(
    storage_api: TestClient, alice: User, token: MakeToken, stored_blobs, pool: asyncpg.Pool
):
    value = await token("object:write")
    over = b"x" * (5 * MIB + 1)
    too_large = {"file": ["File too large, cannot exceed 5 MB"]}
    resp = await upload(storage_api, value, over, name="big.bin")
    assert resp.status == 400
    assert await resp.json() == too_large
    resp = await storage_api.post(
        "/api/objects", headers=bearer(value), data=multipart(over, name="big.bin")
    )
    assert resp.status == 400
    assert await resp.json() == too_large
    # Other fields are still checked, even when they come after the oversized file.
    resp = await storage_api.post(
        "/api/objects", headers=bearer(value), data=multipart(over, name="b@d", namespace="a b")
    )
    assert await resp.json() == {
        **too_large,
        "name": [NAME_RULE],
        "namespace": ["Namespace name can only contain letters and numbers"],
    }
    assert await pool.fetchval("SELECT count(*) FROM objects") == 0
    assert stored_blobs() == []

    exact = b"y" * (5 * MIB)
    body = await create_object(storage_api, value, exact, name="exact.bin")
    assert body["size"] == 5 * MIB
    assert len(stored_blobs()) == 1


async def test_object_limit_follows_the_configuration(
    aiohttp_client: Client, config: Config, pool: asyncpg.Pool, alice: User, token: MakeToken
):
    small = dataclasses.replace(config, objects=config_module.SizeLimit(max_size=1536))
    api = await aiohttp_client(create_app(small, pool))
    resp = await upload(api, await token("object:write"), b"z" * 1537, name="a")
    assert await resp.json() == {"file": ["File too large, cannot exceed 1536 B"]}


@pytest.mark.parametrize(
    ("params", "content", "errors"),
    [
        ({}, b"", {"name": ["Name field required"], "file": ["File field required"]}),
        ({"name": ""}, TEXT, {"name": ["Name field required"]}),
        ({"name": "a b"}, TEXT, {"name": [NAME_RULE]}),
        ({"name": "ok.txt"}, b"", {"file": ["File field required"]}),
        (
            {"name": "ok", "namespace": "bad/-x"},
            TEXT,
            {"namespace": ["Namespace name can only contain letters and numbers"]},
        ),
        (
            {"name": "ok", "namespace": "a" * 33},
            TEXT,
            {"namespace": ["Namespace name cannot be longer than 32 characters"]},
        ),
        (
            {"name": "ok", "namespace": "/".join(["a"] * 21)},
            TEXT,
            {"namespace": ["Namespace cannot exceed depth of 20"]},
        ),
        (
            {"name": "ok", "namespace": "team@nobody"},
            TEXT,
            {"namespace": ["Namespace permission denied"]},
        ),
    ],
)
async def test_create_object_validation(
    api: TestClient,
    alice: User,
    token: MakeToken,
    pool: asyncpg.Pool,
    blob_files,
    params: dict[str, str],
    content: bytes,
    errors: dict[str, list[str]],
):
    resp = await upload(api, await token("object:write"), content, **params)
    assert resp.status == 400
    assert await resp.json() == errors
    assert await pool.fetchval("SELECT count(*) FROM objects") == 0
    assert await pool.fetchval("SELECT count(*) FROM namespaces") == 0
    assert blob_files() == []


async def test_multipart_validation(api: TestClient, alice: User, token: MakeToken, blob_files):
    value = await token("object:write")
    cases = [
        (multipart(None, name="x"), {"file": ["File field required"]}),
        (multipart(b"", name="x"), {"file": ["File field required"]}),
        (multipart(TEXT), {"name": ["Name field required"]}),
    ]
    for form, errors in cases:
        resp = await api.post("/api/objects", headers=bearer(value), data=form)
        assert resp.status == 400
        assert await resp.json() == errors
    # Repeated fields and files: the first counts.
    form = aiohttp.FormData()
    form.add_field("name", "first")
    form.add_field("file", b"one", filename="a")
    form.add_field("name", "second")
    form.add_field("file", b"two", filename="b")
    form.add_field("other", "ignored")
    resp = await api.post("/api/objects", headers=bearer(value), data=form)
    body = await resp.json()
    assert (body["name"], body["size"]) == ("first", 3)
    assert len(blob_files()) == 1


async def test_malformed_multipart_body_is_a_request_error(
    api: TestClient, alice: User, token: MakeToken, blob_files
):
    resp = await api.post(
        "/api/objects",
        headers={
            **bearer(await token("object:write")),
            "Content-Type": "multipart/form-data; boundary=xyz",
        },
        data=b"this is not multipart at all",
    )
    assert resp.status == 400
    assert await resp.json() == {"message": "Malformed multipart body"}
    assert blob_files() == []


async def test_nul_characters_in_fields_are_refused(
    api: TestClient, alice: User, token: MakeToken, blob_files
):
    value = await token("object:write")
    form = multipart(TEXT, name="x", namespace="acme@bo\x00b")
    resp = await api.post("/api/objects", headers=bearer(value), data=form)
    assert resp.status == 400
    assert await resp.json() == {"message": "Form field namespace must not contain NUL characters"}
    resp = await upload(api, value, TEXT, name="x", namespace="acme@bo\x00b")
    assert resp.status == 400
    assert await resp.json() == {
        "message": "Query parameter namespace must not contain NUL characters"
    }
    assert blob_files() == []


async def test_failed_namespace_rolls_back_the_namespaces_it_created(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool, blob_files
):
    resp = await upload(api, await token("object:write"), b"", name="ok", namespace="new/child")
    assert await resp.json() == {"file": ["File field required"]}
    assert await pool.fetchval("SELECT count(*) FROM namespaces") == 0


async def test_create_in_a_new_namespace_creates_it(api: TestClient, alice: User, token: MakeToken):
    value = await token("object:write namespace:read")
    body = await create_object(api, value, TEXT, name="a.csv", namespace="proj/sub")
    ns = await (await api.get("/api/n/alice/proj/sub", headers=bearer(value))).json()
    assert ns["visibility"] == "private"
    assert body == expected(body, alice, "a.csv", TEXT, ns=ns)


async def test_name_is_unique_per_owner_and_per_namespace(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken, blob_files
):
    value = await token(EVERYTHING)
    await create_namespace(api, value, "acme")
    await create_object(api, value, TEXT, name="dup")
    await create_object(api, value, TEXT, name="dup", namespace="acme")
    taken = {"name": ["Name already exists"]}
    for params in ({"name": "dup"}, {"name": "dup", "namespace": "acme"}):
        resp = await upload(api, value, TEXT, **params)
        assert resp.status == 400
        assert await resp.json() == taken
    # Reported together with other fields' errors.
    resp = await upload(api, value, b"", name="dup")
    assert await resp.json() == {**taken, "file": ["File field required"]}
    # Skipped when the namespace rule failed.
    resp = await upload(api, value, TEXT, name="dup", namespace="acme@nobody")
    assert await resp.json() == {"namespace": ["Namespace permission denied"]}
    assert len(blob_files()) == 2  # the refused uploads' content was deleted again
    # Another user's names do not count.
    bob = await make_user("bob")
    await create_object(api, await token("object:write", user=bob), TEXT, name="dup")


async def test_database_uniqueness_backstop_deletes_the_stored_content(
    api: TestClient,
    alice: User,
    token: MakeToken,
    pool: asyncpg.Pool,
    blob_files,
    monkeypatch: pytest.MonkeyPatch,
):
    value = await token("object:write")
    await create_object(api, value, TEXT, name="race")

    async def never_taken(*args: Any) -> bool:
        return False  # as if a concurrent request inserted the name after the check

    monkeypatch.setattr(objects, "name_taken", never_taken)
    resp = await upload(api, value, TEXT, name="race")
    assert resp.status == 400
    assert await resp.json() == {"name": ["Name already exists"]}
    assert await pool.fetchval("SELECT count(*) FROM objects") == 1
    assert len(blob_files()) == 1


async def test_collaborator_creates_in_owners_namespace(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken
):
    bob = await make_user("bob")
    mine, bobs = await token(EVERYTHING), await token(EVERYTHING, user=bob)
    ns = await create_namespace(api, mine, "team")
    await add_collaborator(api, mine, "team", "alice", bobs, "bob")
    body = await create_object(api, bobs, TEXT, name="shared.csv", namespace="team@alice")
    assert body == expected(body, alice, "shared.csv", TEXT, author=bob, ns=ns)
    # bob may see, download and delete it; so may alice.
    resp = await api.get(
        f"/api/objects/{body['id']}", headers={**bearer(bobs), "Accept": body["type"]}
    )
    assert await resp.read() == TEXT
    assert (await api.delete(f"/api/objects/{body['id']}", headers=bearer(bobs))).status == 204


async def test_show_object_access(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken
):
    mine = await token(EVERYTHING)
    bob = await make_user("bob")
    bobs = await token("object:read", user=bob)
    bob_no_scope = await token("namespace:read", user=bob)
    for name, visibility in (("priv", "private"), ("inter", "internal"), ("pub", "public")):
        await create_namespace(api, mine, name, visibility=visibility)
    personal = await create_object(api, mine, TEXT, name="personal")
    priv = await create_object(api, mine, TEXT, name="o", namespace="priv")
    inter = await create_object(api, mine, TEXT, name="o", namespace="inter")
    pub = await create_object(api, mine, TEXT, name="o", namespace="pub")

    async def status(obj: dict[str, Any], headers: dict[str, str]) -> int:
        return (await api.get(f"/api/objects/{obj['id']}", headers=headers)).status

    for obj in (personal, priv, inter, pub):
        assert await status(obj, bearer(mine)) == 200
    assert await status(personal, bearer(bobs)) == 404
    assert await status(priv, bearer(bobs)) == 404
    assert await status(inter, bearer(bobs)) == 200
    assert await status(inter, bearer(bob_no_scope)) == 404  # object:read not waived
    assert await status(inter, {}) == 404
    assert await status(pub, {}) == 200  # public: anonymous, scope waived
    assert await status(pub, bearer(bob_no_scope)) == 200
    assert await status(personal, {}) == 404
    resp = await api.get(f"/api/objects/{pub['id']}", headers={"Accept": pub["type"]})
    assert await resp.read() == TEXT
    assert await (await api.get(f"/api/objects/{pub['id']}")).json() == pub
    for path in ("/api/objects/999999", "/api/objects/" + "9" * 30, "/api/objects/x"):
        assert (await api.get(path, headers=bearer(mine))).status == 404


async def test_delete_object(
    api: TestClient,
    alice: User,
    make_user: MakeUser,
    token: MakeToken,
    pool: asyncpg.Pool,
    blob_files,
):
    mine = await token(EVERYTHING)
    bob = await make_user("bob")
    bobs = await token("object:read,delete", user=bob)
    await create_namespace(api, mine, "pub", visibility="public")
    personal = await create_object(api, mine, TEXT, name="a")
    public = await create_object(api, mine, TEXT, name="b", namespace="pub")
    assert len(blob_files()) == 2
    # Seeing is not using: bob (no collaborator) may not delete, nor may a token without scope.
    for target, headers in (
        (personal, bearer(bobs)),
        (public, bearer(bobs)),
        (personal, bearer(await token("object:read,write"))),
        (personal, {}),
    ):
        resp = await api.delete(f"/api/objects/{target['id']}", headers=headers)
        assert resp.status == 404
        assert await resp.json() == {"message": "Not Found"}
    assert len(blob_files()) == 2

    resp = await api.delete(f"/api/objects/{personal['id']}", headers=bearer(mine))
    assert resp.status == 204
    assert await resp.read() == b""
    assert await pool.fetchval("SELECT count(*) FROM objects") == 1
    assert len(blob_files()) == 1
    assert (await api.get(f"/api/objects/{personal['id']}", headers=bearer(mine))).status == 404
    assert (await api.delete(f"/api/objects/{personal['id']}", headers=bearer(mine))).status == 404


async def test_delete_removes_the_content_on_both_backends(
    storage_api: TestClient, alice: User, token: MakeToken, stored_blobs
):
    value = await token(EVERYTHING)
    body = await create_object(storage_api, value, PNG, name="x.png")
    assert len(stored_blobs()) == 1
    resp = await storage_api.delete(f"/api/objects/{body['id']}", headers=bearer(value))
    assert resp.status == 204
    assert stored_blobs() == []


async def test_create_needs_the_write_scope(
    api: TestClient, alice: User, token: MakeToken, blob_files
):
    for headers in (bearer(await token("object:read")), {}):
        resp = await api.post("/api/objects", headers=headers, params={"name": "x"}, data=TEXT)
        assert resp.status == 404
    assert blob_files() == []


async def test_list_my_objects(api: TestClient, alice: User, make_user: MakeUser, token: MakeToken):
    mine = await token(EVERYTHING)
    bob = await make_user("bob")
    bobs = await token(EVERYTHING, user=bob)
    await create_namespace(api, mine, "acme")
    await create_namespace(api, bobs, "shared")
    await create_namespace(api, bobs, "open", visibility="public")
    await add_collaborator(api, bobs, "shared", "bob", mine, "alice")
    b = await create_object(api, mine, TEXT, name="b-personal")
    a = await create_object(api, mine, TEXT, name="a-team", namespace="acme")
    c = await create_object(api, bobs, TEXT, name="c-shared", namespace="shared")
    await create_object(api, bobs, TEXT, name="d-bobs")
    await create_object(api, bobs, TEXT, name="e-open", namespace="open")

    resp = await api.get("/api/objects", headers=bearer(mine))
    assert resp.status == 200
    listed = await resp.json()
    assert [o["name"] for o in listed] == ["a-team", "b-personal", "c-shared"]
    for entity, created in zip(listed, (a, b, c), strict=True):
        assert entity == created
    resp = await api.get("/api/objects", headers=bearer(mine), params={"search": "TEAM"})
    assert [o["name"] for o in await resp.json()] == ["a-team"]
    assert resp.headers["Link"] == (
        f'<{BASE}/objects?page=1&search=TEAM>; rel="prev", '
        f'<{BASE}/objects?page=1&search=TEAM>; rel="next"'
    )
    for headers in (bearer(await token("namespace:read")), {}):
        assert (await api.get("/api/objects", headers=headers)).status == 404


async def test_listings_are_paginated(api: TestClient, alice: User, token: MakeToken):
    value = await token(EVERYTHING)
    await create_namespace(api, value, "acme", visibility="public")
    for i in range(26):
        await create_object(api, value, TEXT, name=f"obj{i:02}", namespace="acme")
    for path in ("/api/objects", "/api/n/alice/acme/-/objects"):
        first = await api.get(path, headers=bearer(value))
        assert [o["name"] for o in await first.json()] == [f"obj{i:02}" for i in range(25)]
        second = await api.get(path, headers=bearer(value), params={"page": "2"})
        assert [o["name"] for o in await second.json()] == ["obj25"]
        url = BASE + path.removeprefix("/api")
        assert second.headers["Link"] == f'<{url}?page=1>; rel="prev", <{url}?page=2>; rel="next"'


async def test_list_namespace_objects(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken
):
    mine = await token(EVERYTHING)
    bob = await make_user("bob")
    bobs = await token("object:read", user=bob)
    await create_namespace(api, mine, "pub", visibility="public")
    await create_namespace(api, mine, "priv")
    await create_namespace(api, mine, "child", parent="pub")
    top = await create_object(api, mine, TEXT, name="top", namespace="pub")
    await create_object(api, mine, TEXT, name="nested", namespace="pub/child")
    await create_object(api, mine, TEXT, name="secret", namespace="priv")
    await create_object(api, mine, TEXT, name="personal")

    for headers in (bearer(mine), bearer(bobs), {}):
        resp = await api.get("/api/n/alice/pub/-/objects", headers=headers)
        assert resp.status == 200
        assert await resp.json() == [top]
    resp = await api.get("/api/n/alice/pub/-/objects", params={"search": "NES"})
    assert await resp.json() == []
    resp = await api.get("/api/n/alice/pub/child/-/objects", params={"search": "NES"})
    assert [o["name"] for o in await resp.json()] == ["nested"]
    assert [
        o["name"]
        for o in await (await api.get("/api/n/alice/priv/-/objects", headers=bearer(mine))).json()
    ] == ["secret"]
    for path, headers in (
        ("/api/n/alice/priv/-/objects", bearer(bobs)),
        ("/api/n/alice/priv/-/objects", {}),
        ("/api/n/alice/nope/-/objects", bearer(mine)),
        ("/api/n/nobody/pub/-/objects", {}),
    ):
        assert (await api.get(path, headers=headers)).status == 404


async def test_deleting_a_namespace_detaches_its_objects(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool
):
    value = await token(EVERYTHING)
    await create_namespace(api, value, "acme")
    await create_namespace(api, value, "child", parent="acme")
    top = await create_object(api, value, TEXT, name="same", namespace="acme")
    nested = await create_object(api, value, TEXT, name="same", namespace="acme/child")
    personal = await create_object(api, value, TEXT, name="same")
    resp = await api.delete("/api/n/alice/acme", headers=bearer(value))
    assert resp.status == 204
    assert await pool.fetchval("SELECT count(*) FROM namespaces") == 0
    for obj in (top, nested):
        resp = await api.get(f"/api/objects/{obj['id']}", headers=bearer(value))
        assert await resp.json() == {**obj, "namespace_id": None, "namespace": None}
        resp = await api.get(
            f"/api/objects/{obj['id']}", headers={**bearer(value), "Accept": obj["type"]}
        )
        assert await resp.read() == TEXT
    assert await pool.fetchval("SELECT count(*) FROM objects WHERE detached") == 2
    listed = await (await api.get("/api/objects", headers=bearer(value))).json()
    assert sorted(o["id"] for o in listed) == sorted(o["id"] for o in (top, nested, personal))
    # The personal "same" still blocks a new one; the detached ones do not.
    resp = await upload(api, value, TEXT, name="same")
    assert await resp.json() == {"name": ["Name already exists"]}
    await api.delete(f"/api/objects/{personal['id']}", headers=bearer(value))
    await create_object(api, value, TEXT, name="same")


async def test_no_token_appears_in_responses_or_logs(
    api: TestClient, alice: User, token: MakeToken, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    value = await token(EVERYTHING)
    body = await create_object(api, value, TEXT, name="x")
    texts = [
        await (await api.get(f"/api/objects/{body['id']}", headers=bearer(value))).text(),
        await (await api.get("/api/objects", headers=bearer(value))).text(),
    ]
    assert all(value not in text for text in texts)
    assert "POST /api/objects 201" in caplog.text
    assert value not in caplog.text
