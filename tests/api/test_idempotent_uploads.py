"""Idempotency-Key on POST /objects and POST /images (docs/api.md §22, §14.3, §12.3): a retry
of a streamed upload replays the first 201, whatever its multipart framing; a different
request under the same key is refused."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid.api.app import create_app
from marid.api.downloads import DOWNLOADS
from marid.config import Config, OutboundConfig
from marid.users import User
from tests.api.test_images import ARCHIVE, TAR, with_downloads
from tests.conftest import MakeToken, MakeUser, bearer

SCOPES = "object:read,write image:read,write build:write"
CONTENT = b"name,value\nalpha,1\nbeta,2\n"
DIFFERENT = {"message": "Idempotency-Key was used with a different request"}


@pytest.fixture
def config(config: Config) -> Config:
    """The download URL is on loopback, which the outbound policy refuses unless allowed."""
    return dataclasses.replace(config, outbound=OutboundConfig(["127.0.0.0/8"]))


@pytest.fixture
async def client(aiohttp_client: Any, config: Config, pool: asyncpg.Pool) -> TestClient:
    result: TestClient = await aiohttp_client(with_downloads(create_app(config, pool)))
    return result


@pytest.fixture
async def headers(token: MakeToken) -> dict[str, str]:
    return {**bearer(await token(SCOPES)), "Idempotency-Key": "upload-7c0e2f0a"}


@pytest.fixture
def blob_files(tmp_path: Path) -> Callable[[], list[str]]:
    root = tmp_path / "blobs"
    return lambda: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def form(
    content: bytes, fields: list[tuple[str, str]], file_first: bool = True
) -> aiohttp.FormData:
    """A multipart body; aiohttp picks a new random boundary for each one."""
    data = aiohttp.FormData(default_to_multipart=True)
    if file_first:
        data.add_field("file", io.BytesIO(content), filename="upload.bin")
    for name, value in fields:
        data.add_field(name, value)
    if not file_first:
        data.add_field("file", io.BytesIO(content), filename="another-name.bin")
    return data


async def raw_object(
    client: TestClient, headers: dict[str, str], content: bytes = CONTENT, name: str = "data.csv"
) -> aiohttp.ClientResponse:
    return await client.post(
        "/api/objects",
        params={"name": name},
        headers={**headers, "Content-Type": "text/csv"},
        data=io.BytesIO(content),
    )


async def test_a_retried_object_upload_replays_the_first_outcome(
    client: TestClient,
    headers: dict[str, str],
    pool: asyncpg.Pool,
    blob_files: Callable[[], list[str]],
):
    first = await raw_object(client, headers)
    again = await raw_object(client, headers)
    assert (first.status, again.status) == (201, 201)
    assert await again.read() == await first.read()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert await pool.fetchval("SELECT count(*) FROM objects") == 1
    assert len(blob_files()) == 1  # the retry's content was received, then discarded

    # The same retry without the key is what a client without it gets.
    plain = {k: v for k, v in headers.items() if k != "Idempotency-Key"}
    resp = await raw_object(client, plain)
    assert (resp.status, await resp.json()) == (400, {"name": ["Name already exists"]})


async def test_the_framing_of_an_upload_is_not_part_of_the_request(
    client: TestClient, headers: dict[str, str], pool: asyncpg.Pool
):
    """Multipart boundaries, part order, file names and raw versus multipart do not count:
    only the endpoint, the fields it reads and the file's content do."""
    first = await client.post(
        "/api/objects", headers=headers, data=form(CONTENT, [("name", "data.csv")])
    )
    assert first.status == 201, await first.text()
    body = await first.read()
    retries = [
        client.post(
            "/api/objects",
            headers=headers,
            data=form(CONTENT, [("name", "data.csv"), ("other", "x")], file_first=False),
        ),
        raw_object(client, headers),
    ]
    for retry in retries:
        resp = await retry
        assert (resp.status, await resp.read()) == (201, body)
        assert resp.headers["Idempotent-Replayed"] == "true"
    assert await pool.fetchval("SELECT count(*) FROM objects") == 1


async def test_another_request_under_the_same_key_is_refused(
    client: TestClient, headers: dict[str, str], pool: asyncpg.Pool
):
    assert (await raw_object(client, headers)).status == 201
    for resp in [
        await raw_object(client, headers, content=CONTENT + b"gamma,3\n"),
        await raw_object(client, headers, name="other.csv"),
        await client.post(
            "/api/objects",
            headers=headers,
            data=form(CONTENT, [("name", "data.csv"), ("namespace", "acme")]),
        ),
        await client.post("/api/images", headers=headers, data=form(ARCHIVE, [("name", "x")])),
        await client.post("/api/builds", headers=headers, json={"manifest": "image: x"}),
    ]:
        assert (resp.status, await resp.json()) == (422, DIFFERENT)
    assert await pool.fetchval("SELECT count(*) FROM objects") == 1


async def test_keys_are_per_user(
    client: TestClient, headers: dict[str, str], token: MakeToken, make_user: MakeUser
):
    assert (await raw_object(client, headers)).status == 201
    bob = await make_user("bob")
    bobs = {**bearer(await token(SCOPES, user=bob)), "Idempotency-Key": headers["Idempotency-Key"]}
    resp = await raw_object(client, bobs)
    assert resp.status == 201 and "Idempotent-Replayed" not in resp.headers


async def test_a_failed_upload_is_not_kept(
    client: TestClient, headers: dict[str, str], blob_files: Callable[[], list[str]]
):
    bad = await raw_object(client, headers, name="no spaces")
    assert bad.status == 400
    empty = await raw_object(client, headers, content=b"")
    assert (empty.status, await empty.json()) == (400, {"file": ["File field required"]})
    assert blob_files() == []
    good = await raw_object(client, headers)
    assert good.status == 201 and "Idempotent-Replayed" not in good.headers


async def test_a_malformed_key_is_refused_before_the_upload(
    client: TestClient, headers: dict[str, str]
):
    for path in ("/api/objects", "/api/images"):
        resp = await client.post(
            path, headers={**headers, "Idempotency-Key": "a b"}, data=io.BytesIO(CONTENT)
        )
        assert (resp.status, await resp.json()) == (
            400,
            {"idempotency_key": ["Idempotency-Key must be 1 to 255 visible ASCII characters"]},
        )


async def test_a_key_whose_first_request_is_still_running_is_409(
    client: TestClient, headers: dict[str, str], alice: User, pool: asyncpg.Pool
):
    await pool.execute(
        "INSERT INTO idempotency_keys (user_id, key, request_sha256) VALUES ($1, $2, 'x')",
        alice.id,
        headers["Idempotency-Key"],
    )
    resp = await raw_object(client, headers)
    assert (resp.status, await resp.json()) == (
        409,
        {"message": "A request with this Idempotency-Key is in progress"},
    )
    assert await pool.fetchval("SELECT count(*) FROM objects") == 0


async def test_the_outcome_commits_with_the_object(
    client: TestClient, headers: dict[str, str], alice: User, pool: asyncpg.Pool
):
    resp = await raw_object(client, headers)
    row = await pool.fetchrow(
        "SELECT status, body FROM idempotency_keys WHERE user_id = $1 AND key = $2",
        alice.id,
        headers["Idempotency-Key"],
    )
    assert (row["status"], row["body"]) == (201, await resp.read())


async def test_a_retried_image_upload_replays_the_first_outcome(
    client: TestClient, headers: dict[str, str], pool: asyncpg.Pool
):
    fields = [("name", "tools:1.0"), ("driver", "docker")]
    first = await client.post("/api/images", headers=headers, data=form(ARCHIVE, fields))
    assert first.status == 201, await first.text()
    again = await client.post(
        "/api/images",
        params=dict(fields),
        headers={**headers, "Content-Type": TAR},
        data=io.BytesIO(ARCHIVE),
    )
    assert (again.status, await again.read()) == (201, await first.read())
    assert again.headers["Idempotent-Replayed"] == "true"
    other = await client.post(
        "/api/images", headers=headers, data=form(ARCHIVE, [("name", "tools:1.0")])
    )  # the driver field left out: qemu, another request
    assert (other.status, await other.json()) == (422, DIFFERENT)
    assert await pool.fetchval("SELECT count(*) FROM images") == 1


async def test_a_retried_image_download_replays_without_a_second_download(
    client: TestClient, headers: dict[str, str], pool: asyncpg.Pool
):
    body = {"name": "disk", "download_url": "http://127.0.0.1:9/disk.qcow2"}
    first = await client.post("/api/images", headers=headers, json=body)
    again = await client.post("/api/images", headers=headers, json=body)
    assert (first.status, again.status) == (201, 201)
    assert await again.read() == await first.read()
    other = await client.post("/api/images", headers=headers, json={**body, "name": "disk2"})
    assert (other.status, await other.json()) == (422, DIFFERENT)
    await client.app[DOWNLOADS].join()
    assert await pool.fetchval("SELECT count(*) FROM images") == 1
    assert await pool.fetchval("SELECT count(*) FROM image_downloads") == 1
