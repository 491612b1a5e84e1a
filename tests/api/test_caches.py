"""Build caches through the API (docs/api.md §26) and the manifest's `cache:` checks
(docs/manifest.md §10): field-keyed 400s, listing, deletion and who may do either."""

from __future__ import annotations

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import caches
from marid.blobs import open_store
from marid.caches import Scope
from marid.config import Config
from marid.users import User
from tests.api.helpers import BASE, add_collaborator, create_namespace
from tests.conftest import MakeToken, MakeUser, bearer

DOCKER = "driver: {type: docker, image: busybox, workspace: /src}\n"


def with_cache(cache: str, head: str = DOCKER) -> str:
    return f"{head}cache: {cache}\nstages: [a]\njobs: [{{stage: a, commands: [true]}}]\n"


@pytest.mark.parametrize(
    ("cache", "errors"),
    [
        ("deps", ["must be a list of paths, or a mapping with key and paths"]),
        ("[]", ["paths must name at least one path"]),
        ("{key: deps}", ["paths is required"]),
        ("{paths: deps}", ["paths must be a list of paths"]),
        (
            "{key: ../x, paths: [a], keep: 1, when: x}",
            [
                "unknown key keep: a cache has key and paths",
                "unknown key when: a cache has key and paths",
                "key must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or"
                " digit",
            ],
        ),
        (
            "{key: " + "k" * 65 + ", paths: [a]}",
            [
                "key must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or"
                " digit"
            ],
        ),
        (
            '[../up, a/../../b, /etc/passwd, /srcx/a, /src, ".", [n], "", "a\\tb", x, ./x, x/y]',
            [
                "paths[0] must not contain ..",
                "paths[1] must not contain ..",
                "paths[2] /etc/passwd is outside the workspace /src",
                "paths[3] /srcx/a is outside the workspace /src",
                "paths[4] /src is the whole workspace",
                "paths[5] . is the whole workspace",
                "paths[6] must be a string",
                "paths[7] must not be empty",
                "paths[8] must not contain control characters",
                "paths[10] x is listed twice",
                "paths[11] x/y overlaps x",
            ],
        ),
        ("[" + ", ".join(f"p{i}" for i in range(33)) + "]", ["paths must name at most 32 paths"]),
        ("[" + "a" * 1025 + "]", ["paths[0] must be at most 1024 characters"]),
    ],
)
async def test_a_bad_cache_is_a_field_error(
    api: TestClient, token: MakeToken, cache: str, errors: list[str]
):
    resp = await api.post(
        "/api/builds",
        headers=bearer(await token("build:write")),
        json={"manifest": with_cache(cache)},
    )
    assert resp.status == 400
    assert await resp.json() == {"cache": errors}


async def test_absolute_paths_need_the_docker_workspace_and_errors_come_with_the_manifests(
    api: TestClient, token: MakeToken
):
    text = with_cache("[/tmp/x]", head="driver: {type: qemu}\n")
    resp = await api.post(
        "/api/builds", headers=bearer(await token("build:write")), json={"manifest": text}
    )
    assert resp.status == 400
    assert await resp.json() == {
        "manifest": [
            "Manifest driver qemu requires image",
            "Manifest driver error: qemu-x86_64 - driver disabled",
        ],
        "cache": ["paths[0] /tmp/x is outside the workspace (use a relative path)"],
    }


async def test_a_cache_path_must_stay_out_of_clone_directories(api: TestClient, token: MakeToken):
    text = "sources: [https://example.com/app.git, https://example.com/b.git => lib/b]\n"
    resp = await api.post(
        "/api/builds",
        headers=bearer(await token("build:write")),
        json={"manifest": text + with_cache("[app/node_modules, lib, x]")},
    )
    assert resp.status == 400
    assert await resp.json() == {
        "cache": [
            "paths[0] app/node_modules overlaps the clone directory of sources[0]",
            "paths[1] lib overlaps the clone directory of sources[1]",
        ]
    }


async def test_a_cron_job_checks_its_cache_too(api: TestClient, token: MakeToken):
    resp = await api.post(
        "/api/cron",
        headers=bearer(await token("cron:write")),
        json={"name": "nightly", "schedule": "daily", "manifest": with_cache("[../x]")},
    )
    assert resp.status == 400
    assert await resp.json() == {"cache": ["paths[0] must not contain .."]}


async def test_a_good_cache_is_stored_with_the_build_normalised(
    api: TestClient, token: MakeToken, pool: asyncpg.Pool, alice: User
):
    text = "namespace: proj\n" + with_cache("{key: v1.deps, paths: [/src/a/, ./b, c/./d]}")
    resp = await api.post(
        "/api/builds", headers=bearer(await token("build:write")), json={"manifest": text}
    )
    assert resp.status == 201, await resp.text()
    async with pool.acquire() as conn:
        found = await caches.of_build(conn, (await resp.json())["id"])
        ns = await conn.fetchval("SELECT id FROM namespaces WHERE path = 'proj'")
    assert found == caches.BuildCache(Scope(alice.id, ns), "v1.deps", ("a", "b", "c/d"))


# -- Listing and deletion ----------------------------------------------------------------------


async def saved(
    pool: asyncpg.Pool, config: Config, scope: Scope, key: str, build_id: int | None = None
) -> str:
    """Save an entry as a runner would (a real blob, the real swap); its blob key."""
    store = open_store(config.storage)
    blob = await store.put_bytes(b"a tar, for the API's purposes")
    await store.close()
    async with pool.acquire() as conn, conn.transaction():
        await caches.store(conn, scope, key, ["deps"], (blob.key, blob.size), build_id, 2**30)
    return blob.key


async def blob_exists(config: Config, key: str) -> bool:
    store = open_store(config.storage)
    try:
        return await store.exists(key)
    finally:
        await store.close()


async def test_a_namespace_lists_and_deletes_its_caches(
    api: TestClient, token: MakeToken, pool: asyncpg.Pool, config: Config, alice: User
):
    value = await token("build:read,write,delete namespace:write")
    ns = await create_namespace(api, value, "proj")
    resp = await api.post(
        "/api/builds",
        headers=bearer(value),
        json={"manifest": "namespace: proj\n" + with_cache("[deps]")},
    )
    build = await resp.json()
    scope = Scope(alice.id, ns["id"])
    first = await saved(pool, config, scope, "a", build["id"])
    await saved(pool, config, scope, "b")
    mine = await saved(pool, config, Scope(alice.id, None), "a")

    resp = await api.get("/api/n/alice/proj/-/caches", headers=bearer(value))
    assert resp.status == 200
    listed = await resp.json()
    assert [e["key"] for e in listed] == ["b", "a"]  # most recently used first
    assert listed[1] == {
        "key": "a",
        "paths": ["deps"],
        "size": 29,
        "created_at": listed[1]["created_at"],
        "last_used_at": listed[1]["last_used_at"],
        "build_url": f"{BASE}/b/alice/{build['number']}",
        "url": f"{BASE}/n/alice/proj/-/caches/a",
    }
    shown = await api.get("/api/n/alice/proj/-/caches/a", headers=bearer(value))
    assert await shown.json() == listed[1]
    personal = await (await api.get("/api/caches", headers=bearer(value))).json()
    assert [(e["key"], e["build_url"], e["url"]) for e in personal] == [
        ("a", None, f"{BASE}/caches/a")
    ]

    resp = await api.delete("/api/n/alice/proj/-/caches/a", headers=bearer(value))
    assert resp.status == 204
    assert not await blob_exists(config, first)
    assert await blob_exists(config, mine)  # the personal `a` is another scope's
    resp = await api.delete("/api/n/alice/proj/-/caches/a", headers=bearer(value))
    assert resp.status == 404
    resp = await api.delete("/api/n/alice/proj/-/caches", headers=bearer(value))
    assert resp.status == 204
    assert await (await api.get("/api/n/alice/proj/-/caches", headers=bearer(value))).json() == []
    resp = await api.delete("/api/caches/a", headers=bearer(value))
    assert resp.status == 204
    assert not await blob_exists(config, mine)


async def test_strangers_see_nothing_and_readers_cannot_delete(
    api: TestClient,
    token: MakeToken,
    pool: asyncpg.Pool,
    config: Config,
    alice: User,
    make_user: MakeUser,
):
    owner = await token("build:read,delete namespace:read,write invite:read,write,delete")
    ns = await create_namespace(api, owner, "proj", visibility="internal")
    await saved(pool, config, Scope(alice.id, ns["id"]), "deps")
    await saved(pool, config, Scope(alice.id, None), "mine")
    bob = await make_user("bob")
    carol = await make_user("carol")
    stranger = await token("build:read,delete", user=bob)
    collaborator = await token("build:read,delete invite:read,write", user=carol)
    await add_collaborator(api, owner, "proj", "alice", collaborator, "carol")
    reader = await token("build:read", user=carol)

    url = "/api/n/alice/proj/-/caches"
    assert (await api.get(url)).status == 404  # anonymous: internal is for signed-in users
    listed = await api.get(url, headers=bearer(stranger))  # internal: any user may see it
    assert listed.status == 200
    assert (await api.delete(url + "/deps", headers=bearer(stranger))).status == 404
    assert (await api.delete(url, headers=bearer(stranger))).status == 404
    assert (await api.delete(url + "/deps", headers=bearer(reader))).status == 404
    assert (await api.get("/api/caches/mine", headers=bearer(stranger))).status == 404
    assert await (await api.get("/api/caches", headers=bearer(stranger))).json() == []

    resp = await api.patch(
        "/api/n/alice/proj", headers=bearer(owner), json={"visibility": "private"}
    )
    assert resp.status == 200, await resp.text()
    assert (await api.get(url, headers=bearer(stranger))).status == 404
    assert (await api.get(url + "/deps", headers=bearer(stranger))).status == 404
    assert (await api.get(url, headers=bearer(reader))).status == 200
    assert (await api.get(url, headers=bearer(await token("namespace:read")))).status == 404
    assert (await api.delete(url + "/deps", headers=bearer(collaborator))).status == 204
