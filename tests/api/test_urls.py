"""`url` fields name exactly their entity (issue 11 row 17): every path segment built from a
name is percent-encoded, so GETting the url returns the thing; and a namespace path sent with
its `/` encoded (`/n/alice/a%2Fb`, as OpenAPI clients send a path parameter) is accepted."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import jobs
from marid.api.app import create_app
from marid.api.http import url_path
from marid.blobs import open_store
from marid.config import Config
from marid.users import User
from tests.api.helpers import BASE, create_namespace
from tests.conftest import MakeToken, bearer

SCOPE = "build:read,write,delete namespace:read,write"
ORIGIN = BASE.removesuffix("/api")
NAMES = ["a b?c#d.txt", "dir/sub dir/été 100%.txt", "a%2Fb", "plain.txt", "x/./y/../z"]
MANIFEST = """\
driver:
  type: docker
  image: alpine
  workspace: /w
stages: [build]
jobs:
- stage: build
  name: make
  commands: [make]
  artifacts:
""" + "".join(f"  - 'out/{n} => {name}'\n" for n, name in enumerate(NAMES))


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], config: Config, pool: asyncpg.Pool
) -> TestClient:
    return await aiohttp_client(create_app(dataclasses.replace(config, drivers=["docker"]), pool))


def path_of(url: str) -> str:
    assert url.startswith(ORIGIN + "/"), url
    return url.removeprefix(ORIGIN)


async def get(client: TestClient, url: str, **headers: str) -> Any:
    resp = await client.get(path_of(url), headers=headers)
    assert resp.status == 200, (url, resp.status, await resp.text())
    return await resp.json() if resp.content_type == "application/json" else await resp.read()


def test_url_path_encodes_each_segment():
    assert url_path("a b?c#d.txt") == "a%20b%3Fc%23d.txt"
    assert url_path("dir/sub dir/été 100%.txt") == "dir/sub%20dir/%C3%A9t%C3%A9%20100%25.txt"
    assert url_path("a%2Fb") == "a%252Fb"  # a literal %2F in a name stays literal
    assert url_path("x/./y/../z") == "x/%2E/y/%2E%2E/z"
    assert jobs.url_segment("unit-tests") == "unit-tests"
    assert jobs.url_segment("..") == "%2E%2E"


async def test_artifact_urls_return_their_artifact(
    client: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool, config: Config
):
    headers = bearer(await token(SCOPE))
    resp = await client.post("/api/builds", headers=headers, json={"manifest": MANIFEST})
    assert resp.status == 201, await resp.text()
    store = open_store(config.storage)
    try:
        async with pool.acquire() as conn:
            for name in NAMES:
                blob = await store.put_bytes(f"content of {name}".encode())
                await conn.execute(
                    "UPDATE build_artifacts SET blob_key = $1, size = $2 WHERE name = $3",
                    blob.key,
                    blob.size,
                    name,
                )
    finally:
        await store.close()
    resp = await client.get("/api/b/alice/1/artifacts", headers=headers)
    listed = await resp.json()
    assert sorted(a["name"] for a in listed) == sorted(NAMES)
    for artifact in listed:
        url = artifact["url"]
        assert url == f"{BASE}/b/alice/1/artifacts/{url_path(artifact['name'])}"
        assert " " not in url and "?" not in url and "#" not in url
        if "/./" in artifact["name"]:
            continue  # dot segments: yarl, as every WHATWG client, resolves even %2E
        shown = await get(client, url, **headers)
        assert shown["name"] == artifact["name"]
        content = await get(client, url, Accept="application/octet-stream", **headers)
        assert content == f"content of {artifact['name']}".encode()
        assert (await get(client, artifact["job"]["url"], **headers))["name"] == "make"


async def test_tag_urls_return_their_tag(client: TestClient, alice: User, token: MakeToken):
    headers = bearer(await token(SCOPE))
    resp = await client.post("/api/builds", headers=headers, json={"manifest": MANIFEST})
    assert resp.status == 201
    names = ["déjà/vu", "release/1.0", "ünïcödé"]
    resp = await client.post("/api/b/alice/1/tags", headers=headers, json=names)
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert sorted(tag["name"] for tag in created) == sorted(names)
    for tag in created:
        assert tag["url"] == f"{BASE}/b/alice/1/tags/{url_path(tag['name'])}"
        assert tag["url"].isascii()
        assert (await get(client, tag["url"], **headers))["name"] == tag["name"]
    resp = await client.get("/api/b/alice/1/tags", headers=headers)
    for tag in await resp.json():
        assert (await get(client, tag["url"], **headers))["name"] == tag["name"]


async def test_a_namespace_path_with_encoded_slashes_is_accepted(
    client: TestClient, alice: User, token: MakeToken
):
    value = await token(SCOPE)
    await create_namespace(client, value, "acme")
    await create_namespace(client, value, "web", parent="acme")
    await create_namespace(client, value, "api", parent="acme/web")
    for path in ("acme%2Fweb%2Fapi", "acme%2fweb/api", "acme/web%2Fapi"):
        resp = await client.get(f"/api/n/alice/{path}", headers=bearer(value))
        assert resp.status == 200, path
        assert (await resp.json())["path"] == "acme/web/api"
        resp = await client.get(f"/api/n/alice/{path}/-/builds", headers=bearer(value))
        assert resp.status == 200, path
    resp = await client.get("/api/n/alice/acme%2F", headers=bearer(value))
    assert resp.status == 404
