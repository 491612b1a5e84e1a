"""Images (docs/api.md §12, docs/manifest.md §9.2, §8.8): qemu and docker uploads, background
downloads from a local HTTP server, access, detaching, and the runner's docker lookup."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import logging
import socket
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import asyncssh
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from marid import config as config_module
from marid import images
from marid.api import downloads
from marid.api.app import create_app
from marid.api.downloads import DOWNLOADS
from marid.config import Config
from marid.crypto import Cipher
from marid.users import User
from marid.validation import Errors
from tests.api.helpers import BASE, add_collaborator, create_namespace, user_json
from tests.conftest import MakeToken, MakeUser, bearer
from tests.fixtures.s3 import NOT_NEEDED

EVERYTHING = "image:read,write,delete namespace:read,write,delete invite:read,write"
QCOW2 = b"QFI\xfb" + bytes(range(256)) * 16
QEMU_DISK = "application/x-qemu-disk"
TAR = "application/x-tar"
QEMU_NAME_RULE = "Name can only have letters, numbers, dashes, and underscores"
DOCKER_NAME_RULE = "Name is not a valid docker image reference"
PASSWORD = "pa55-w0rd-never-shown"

MakeClient = Callable[..., Awaitable[TestClient]]


def docker_archive(tags: tuple[str, ...] = ("alpine:3.19",), manifest: bool = True) -> bytes:
    """A minimal `docker save` archive: manifest.json, a config and one layer."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("0123abcd.json", b'{"architecture": "amd64"}')
        add("layer0/layer.tar", b"\0" * 2048)
        if manifest:
            entry = {
                "Config": "0123abcd.json",
                "RepoTags": list(tags),
                "Layers": ["layer0/layer.tar"],
            }
            add("manifest.json", json.dumps([entry]).encode())
    return out.getvalue()


ARCHIVE = docker_archive()


def embedded(ns: dict[str, Any]) -> dict[str, Any]:
    return {**ns, "parent": None, "build": None}


def expected(
    body: dict[str, Any],
    owner: User,
    name: str,
    driver: str = "qemu",
    author: User | None = None,
    ns: dict[str, Any] | None = None,
    download: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole Image entity for `body`'s id and created_at."""
    author = author or owner
    return {
        "id": body["id"],
        "author_id": author.id,
        "user_id": owner.id,
        "namespace_id": ns["id"] if ns else None,
        "driver": driver,
        "name": name,
        "created_at": body["created_at"],
        "url": f"{BASE}/images/{body['id']}",
        "author": user_json(author),
        "user": user_json(owner),
        "namespace": embedded(ns) if ns else None,
        "download": download,
    }


def multipart(content: bytes | None, **fields: str) -> aiohttp.FormData:
    """A multipart form with the file part first and the fields after it."""
    form = aiohttp.FormData(default_to_multipart=True)
    if content is not None:
        form.add_field("file", io.BytesIO(content), filename="image")
    for name, value in fields.items():
        form.add_field(name, value)
    return form


async def upload(api: TestClient, token: str, content: bytes, **params: str) -> Any:
    return await api.post(
        "/api/images",
        headers={**bearer(token), "Content-Type": QEMU_DISK},
        params=params,
        data=io.BytesIO(content),
    )


async def create_image(api: TestClient, token: str, content: bytes, **params: str) -> Any:
    resp = await upload(api, token, content, **params)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def start_download(api: TestClient, token: str, **fields: Any) -> Any:
    resp = await api.post("/api/images", headers=bearer(token), json=fields)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def finished(api: TestClient, token: str, image: dict[str, Any]) -> Any:
    """The image once every running download has ended."""
    await api.app[DOWNLOADS].join()
    resp = await api.get(f"/api/images/{image['id']}", headers=bearer(token))
    return await resp.json()


def with_downloads(app: web.Application) -> web.Application:
    # api/app.py registers the downloads context; add it here if it does not (yet).
    if downloads.context not in app.cleanup_ctx:
        app.cleanup_ctx.append(downloads.context)
    return app


@pytest.fixture
def config(config: Config) -> Config:
    """The download sources here listen on loopback, which the outbound policy refuses unless
    it is allowed (tests/api/test_download_policy.py tests the refusals)."""
    return dataclasses.replace(config, outbound=config_module.OutboundConfig(["127.0.0.0/8"]))


@pytest.fixture
def make_client(aiohttp_client: Any, config: Config, pool: asyncpg.Pool) -> MakeClient:
    """`await make_client(max_size=..., storage=...)` -> an API client running downloads."""

    async def make(max_size: int = 0, storage: dict[str, Any] | None = None) -> TestClient:
        cfg = dataclasses.replace(config, images=config_module.SizeLimit(max_size=max_size))
        if storage is not None:
            settings = config_module.from_dict({"storage": storage}, optional=NOT_NEEDED)
            cfg = dataclasses.replace(cfg, storage=settings.storage)
        client: TestClient = await aiohttp_client(with_downloads(create_app(cfg, pool)))
        return client

    return make


@pytest.fixture
async def api(make_client: MakeClient) -> TestClient:
    return await make_client()


@pytest.fixture
async def storage_api(make_client: MakeClient, storage_settings: dict[str, Any]) -> TestClient:
    """An API client whose blob store is the parametrised backend (fs, s3)."""
    return await make_client(storage=storage_settings)


@pytest.fixture
def blob_files(tmp_path: Path) -> Callable[[], list[str]]:
    root = tmp_path / "blobs"
    return lambda: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@dataclasses.dataclass
class Origin:
    """A download source on 127.0.0.1: /disk.qcow2, /big.qcow2 and /text; the rest is 404."""

    server: TestServer
    authorizations: list[str | None]
    requested: asyncio.Event
    gate: asyncio.Event  # cleared: /disk.qcow2 waits until it is set

    def url(self, path: str, userinfo: str = "") -> str:
        url = str(self.server.make_url(path))
        return url.replace("://", f"://{userinfo}@", 1) if userinfo else url


@pytest.fixture
async def origin(aiohttp_server: Any) -> AsyncIterator[Origin]:
    authorizations: list[str | None] = []
    requested, gate = asyncio.Event(), asyncio.Event()
    gate.set()

    async def disk(request: web.Request) -> web.Response:
        authorizations.append(request.headers.get("Authorization"))
        requested.set()
        await gate.wait()
        return web.Response(body=QCOW2, content_type="application/octet-stream")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=QCOW2 * 4)

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="hello, not a disk")

    app = web.Application()
    app.router.add_get("/disk.qcow2", disk)
    app.router.add_get("/big.qcow2", big)
    app.router.add_get("/text", text)
    found = Origin(await aiohttp_server(app), authorizations, requested, gate)
    yield found
    gate.set()


async def test_raw_qemu_upload_and_download_are_byte_identical(
    storage_api: TestClient, alice: User, token: MakeToken, stored_blobs
):
    value = await token(EVERYTHING)
    ns = await create_namespace(storage_api, value, "acme")
    body = await create_image(storage_api, value, QCOW2, name="debian-dev", namespace="acme")
    assert body["created_at"].endswith("Z")
    assert body == expected(body, alice, "debian-dev", ns=ns)
    assert len(stored_blobs()) == 1
    resp = await storage_api.get(
        f"/api/images/{body['id']}", headers={**bearer(value), "Accept": QEMU_DISK}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == QEMU_DISK
    assert resp.headers["Content-Length"] == str(len(QCOW2))
    assert await resp.read() == QCOW2
    for accept in (TAR, "*/*", "application/json"):
        resp = await storage_api.get(
            f"/api/images/{body['id']}", headers={**bearer(value), "Accept": accept}
        )
        assert await resp.json() == body


async def test_docker_archive_multipart_upload(
    storage_api: TestClient, alice: User, token: MakeToken, stored_blobs
):
    value = await token(EVERYTHING)
    resp = await storage_api.post(
        "/api/images",
        headers=bearer(value),
        data=multipart(ARCHIVE, name="library/alpine:3.19", driver="docker"),
    )
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body == expected(body, alice, "library/alpine:3.19", driver="docker")
    resp = await storage_api.get(
        f"/api/images/{body['id']}", headers={**bearer(value), "Accept": TAR}
    )
    assert resp.headers["Content-Type"] == TAR
    assert await resp.read() == ARCHIVE
    resp = await storage_api.get(
        f"/api/images/{body['id']}", headers={**bearer(value), "Accept": QEMU_DISK}
    )
    assert await resp.json() == body
    assert len(stored_blobs()) == 1


async def test_raw_docker_upload_with_query_driver(api: TestClient, alice: User, token: MakeToken):
    body = await create_image(
        api, await token("image:write"), ARCHIVE, name="alpine", driver="docker"
    )
    assert body == expected(body, alice, "alpine", driver="docker")


async def test_over_the_limit_leaves_nothing_behind(
    make_client: MakeClient,
    storage_settings: dict[str, Any],
    alice: User,
    token: MakeToken,
    stored_blobs,
    pool: asyncpg.Pool,
):
    api = await make_client(max_size=4096, storage=storage_settings)
    value = await token("image:write")
    too_large = "File too large, cannot exceed 4 KB"
    over = QCOW2[:4096] + b"!"
    resp = await upload(api, value, over, name="big")
    assert resp.status == 400
    assert await resp.json() == {"file": [too_large]}
    resp = await upload(api, value, b"x" * 4097, name="big")
    assert await resp.json() == {"file": ["File not a valid QCOW2 file format", too_large]}
    resp = await api.post(
        "/api/images",
        headers=bearer(value),
        data=multipart(b"\0" * 5000, name="big", driver="docker"),
    )
    assert await resp.json() == {"file": [too_large]}
    assert await pool.fetchval("SELECT count(*) FROM images") == 0
    assert stored_blobs() == []
    await create_image(api, value, QCOW2[:4096], name="exact")
    assert len(stored_blobs()) == 1


@pytest.mark.parametrize(
    ("params", "content", "errors"),
    [
        ({}, b"", {"name": ["Name field required"], "file": ["File field required"]}),
        ({"name": "bad name"}, QCOW2, {"name": [QEMU_NAME_RULE]}),
        ({"name": "a.b"}, QCOW2, {"name": [QEMU_NAME_RULE]}),
        ({"name": "ok"}, b"not a disk", {"file": ["File not a valid QCOW2 file format"]}),
        ({"name": "ok", "driver": "vmware"}, b"x", {"driver": ["Driver must be qemu or docker"]}),
        ({"name": "Alpine", "driver": "docker"}, ARCHIVE, {"name": [DOCKER_NAME_RULE]}),
        (
            {"name": "alpine", "driver": "docker"},
            QCOW2,
            {"file": ["File not a valid docker image archive"]},
        ),
        (
            {"name": "alpine", "driver": "docker"},
            docker_archive(manifest=False),
            {"file": ["File not a valid docker image archive"]},
        ),
        (
            {"name": "ok", "namespace": "no-dash"},
            QCOW2,
            {"namespace": ["Namespace name can only contain letters and numbers"]},
        ),
        (
            {"name": "ok", "namespace": "x@nobody"},
            QCOW2,
            {"namespace": ["Namespace permission denied"]},
        ),
        (
            {"name": "b@d", "namespace": "a" * 33},
            b"",
            {
                "name": [QEMU_NAME_RULE],
                "namespace": ["Namespace name cannot be longer than 32 characters"],
                "file": ["File field required"],
            },
        ),
    ],
)
async def test_upload_validation(
    api: TestClient,
    alice: User,
    token: MakeToken,
    pool: asyncpg.Pool,
    blob_files,
    params: dict[str, str],
    content: bytes,
    errors: dict[str, list[str]],
):
    resp = await upload(api, await token("image:write"), content, **params)
    assert resp.status == 400
    assert await resp.json() == errors
    assert await pool.fetchval("SELECT count(*) FROM images") == 0
    assert await pool.fetchval("SELECT count(*) FROM namespaces") == 0
    assert blob_files() == []


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("alpine", True),
        ("alpine:3.19", True),
        ("my-org/my_image.v2:Latest_1", True),
        ("a/b/c", True),
        ("a" * 200 + ":" + "t" * 128, True),
        ("Alpine", False),
        ("alpine:", False),
        ("-alpine", False),
        ("alpine-", False),
        ("alpine:-x", False),
        ("a//b", False),
        ("a:b:c", False),
        ("alpine:" + "t" * 129, False),
        ("localhost:5000/alpine", False),
    ],
)
def test_docker_reference_syntax(name: str, valid: bool):
    errors = Errors()
    images.check_name(name, "docker", errors)
    assert (not errors.by_field) is valid


async def test_multipart_fields_in_any_order_and_empty_file(
    api: TestClient, alice: User, token: MakeToken, blob_files
):
    value = await token("image:write")
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("driver", "docker")
    form.add_field("file", io.BytesIO(ARCHIVE), filename="a.tar")
    form.add_field("name", "busybox")
    resp = await api.post("/api/images", headers=bearer(value), data=form)
    assert resp.status == 201
    resp = await api.post("/api/images", headers=bearer(value), data=multipart(b"", name="e"))
    assert await resp.json() == {"file": ["File field required"]}
    assert len(blob_files()) == 1


async def test_name_is_unique_across_drivers_per_owner_and_namespace(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken, blob_files
):
    value = await token(EVERYTHING)
    await create_namespace(api, value, "acme")
    await create_image(api, value, QCOW2, name="alpine")
    await create_image(api, value, QCOW2, name="alpine", namespace="acme")
    taken = {"name": ["Name already exists"]}
    resp = await upload(api, value, ARCHIVE, name="alpine", driver="docker")
    assert await resp.json() == taken
    resp = await upload(api, value, QCOW2, name="alpine", namespace="acme")
    assert await resp.json() == taken
    resp = await api.post(
        "/api/images",
        headers=bearer(value),
        json={"name": "alpine", "download_url": "http://127.0.0.1:9/x"},
    )
    assert await resp.json() == taken
    resp = await upload(api, value, b"", name="alpine", namespace="acme@nobody")
    assert await resp.json() == {
        "namespace": ["Namespace permission denied"],
        "file": ["File field required"],
    }
    assert len(blob_files()) == 2
    bob = await make_user("bob")
    await create_image(api, await token("image:write", user=bob), QCOW2, name="alpine")


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, {"name": ["Name field required"], "file": ["File field required"]}),
        ({"name": "x"}, {"file": ["File field required"]}),
        (
            {"name": "x", "download_url": "ftp://example.com/x"},
            {"download_url": ["Download URL invalid url scheme"]},
        ),
        (
            {"name": "x", "download_url": "not a url"},
            {"download_url": ["Download URL invalid url scheme"]},
        ),
        (
            {"name": "x", "download_url": "http://[::1/x"},
            {"download_url": ["Download URL invalid url scheme"]},
        ),
        (
            {"name": "x", "download_url": "sftp://user@example.com/x.qcow2"},
            {"download_url": ["Download URL missing password from SFTP URL"]},
        ),
        (
            {"name": "x", "download_url": "http://example.com/x", "driver": "docker"},
            {"download_url": ["Download URL is not supported for docker images"]},
        ),
        (
            {"name": "x", "download_url": "http://example.com/x", "driver": "lxc"},
            {"driver": ["Driver must be qemu or docker"]},
        ),
        ({"name": "a b", "download_url": "http://e.com/x"}, {"name": [QEMU_NAME_RULE]}),
        (
            {"name": 5, "download_url": 3, "driver": True, "namespace": ["a"]},
            {
                "name": ["Name must be a string"],
                "download_url": ["Download URL must be a string"],
                "driver": ["Driver must be a string"],
                "namespace": ["Namespace must be a string"],
            },
        ),
        (
            {"name": "x", "download_url": "http://e.com/x", "namespace": "x@nobody"},
            {"namespace": ["Namespace permission denied"]},
        ),
    ],
)
async def test_download_validation(
    api: TestClient,
    alice: User,
    token: MakeToken,
    pool: asyncpg.Pool,
    body: dict[str, Any],
    errors: dict[str, list[str]],
):
    resp = await api.post("/api/images", headers=bearer(await token("image:write")), json=body)
    assert resp.status == 400
    assert await resp.json() == errors
    assert await pool.fetchval("SELECT count(*) FROM images") == 0


async def test_malformed_json_download_body(api: TestClient, alice: User, token: MakeToken):
    resp = await api.post(
        "/api/images",
        headers={**bearer(await token("image:write")), "Content-Type": "application/json"},
        data=b'{"name": ',
    )
    assert resp.status == 400
    assert await resp.json() == {"message": "Malformed JSON body"}


async def test_http_download_with_basic_auth_never_shows_the_password(
    storage_api: TestClient,
    alice: User,
    token: MakeToken,
    origin: Origin,
    pool: asyncpg.Pool,
    stored_blobs,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.DEBUG)
    value = await token(EVERYTHING)
    ns = await create_namespace(storage_api, value, "acme")
    url = origin.url("/disk.qcow2", f"us%40er:{PASSWORD}")
    origin.gate.clear()
    body = await start_download(
        storage_api, value, name="remote", namespace="acme", download_url=url
    )
    source = origin.url("/disk.qcow2", "us%40er:xxxxx")
    pending = {"source": source, "error": None, "created_at": body["download"]["created_at"]}
    assert body == expected(
        body, alice, "remote", ns=ns, download={**pending, "started_at": None, "finished_at": None}
    )
    texts = [json.dumps(body)]
    await origin.requested.wait()
    row = await pool.fetchrow("SELECT * FROM image_downloads")
    assert row["secret_url"] is not None and PASSWORD.encode() not in row["secret_url"]
    resp = await storage_api.get(
        f"/api/images/{body['id']}", headers={**bearer(value), "Accept": QEMU_DISK}
    )
    assert resp.status == 404  # not downloaded yet
    origin.gate.set()

    done = await finished(storage_api, value, body)
    assert done["download"]["started_at"].endswith("Z")
    assert done["download"]["finished_at"].endswith("Z")
    assert done == expected(
        body,
        alice,
        "remote",
        ns=ns,
        download={
            **pending,
            "started_at": done["download"]["started_at"],
            "finished_at": done["download"]["finished_at"],
        },
    )
    # The user info went out as Basic auth, percent-decoded.
    assert origin.authorizations == [
        "Basic " + base64.b64encode(f"us@er:{PASSWORD}".encode()).decode()
    ]
    resp = await storage_api.get(
        f"/api/images/{body['id']}", headers={**bearer(value), "Accept": QEMU_DISK}
    )
    assert await resp.read() == QCOW2
    assert len(stored_blobs()) == 1
    # The URL is forgotten once finished; nothing anywhere shows the password.
    row = await pool.fetchrow("SELECT * FROM image_downloads")
    assert row["secret_url"] is None
    dump = await pool.fetchval("SELECT string_agg(d::text, '') FROM image_downloads d")
    assert PASSWORD not in dump
    for path in ("/api/images", f"/api/images/{body['id']}", "/api/n/alice/acme/-/images"):
        texts.append(await (await storage_api.get(path, headers=bearer(value))).text())
    assert all(PASSWORD not in text and source in text for text in texts)
    assert "POST /api/images 201" in caplog.text
    assert "downloaded" in caplog.text
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/missing.qcow2", "download failed: unexpected status 404 Not Found"),
        ("/text", "not a valid qcow2 file"),
        ("/big.qcow2", "file too large, cannot exceed 8 KB"),
    ],
)
async def test_failed_downloads_record_their_error(
    make_client: MakeClient,
    alice: User,
    token: MakeToken,
    origin: Origin,
    blob_files,
    path: str,
    error: str,
):
    api = await make_client(max_size=8192)
    value = await token("image:read,write")
    body = await start_download(api, value, name="broken", download_url=origin.url(path))
    done = await finished(api, value, body)
    assert done["download"]["error"] == error
    assert done["download"]["finished_at"] is not None
    resp = await api.get(
        f"/api/images/{body['id']}", headers={**bearer(value), "Accept": QEMU_DISK}
    )
    assert resp.status == 404
    assert blob_files() == []


async def test_unreachable_source_records_a_connection_error(
    api: TestClient, alice: User, token: MakeToken
):
    value = await token("image:read,write")
    body = await start_download(api, value, name="far", download_url="http://127.0.0.1:9/x")
    done = await finished(api, value, body)
    assert done["download"]["error"].startswith("download failed: ")


async def test_a_download_is_bounded_in_time(
    api: TestClient,
    alice: User,
    token: MakeToken,
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(downloads, "TIMEOUT", 0.2)
    value = await token("image:read,write")
    origin.gate.clear()  # the source never answers
    body = await start_download(api, value, name="slow", download_url=origin.url("/disk.qcow2"))
    done = await finished(api, value, body)
    assert done["download"]["error"] == "download timed out after 0.2 seconds"


async def test_an_unexpected_failure_is_logged_and_recorded(
    api: TestClient,
    alice: User,
    token: MakeToken,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    def broken(*args: Any) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(images, "open_url", broken)
    value = await token("image:read,write")
    body = await start_download(api, value, name="x", download_url="http://127.0.0.1:9/x")
    done = await finished(api, value, body)
    assert done["download"]["error"] == "download failed: internal error"
    assert "image 1 download crashed" in caplog.text


async def test_pending_downloads_are_resumed_or_failed_at_start_up(
    make_client: MakeClient,
    alice: User,
    token: MakeToken,
    origin: Origin,
    pool: asyncpg.Pool,
    config: Config,
):
    # As a crashed server leaves them: started, never finished, the lease run out.
    cipher = Cipher(config.crypto.key)
    url = origin.url("/disk.qcow2")
    ids = []
    async with pool.acquire() as conn:
        for name, attempts in (("resumed", 1), ("given-up", downloads.MAX_ATTEMPTS)):
            image_id = await images.create(conn, alice, None, "qemu", name, None)
            await images.add_download(conn, image_id, url, images.seal_url(cipher, image_id, url))
            await conn.execute(
                "UPDATE image_downloads SET started_at = now(), attempts = $2,"
                " lease_expires_at = now() - interval '1 second' WHERE image_id = $1",
                image_id,
                attempts,
            )
            ids.append(image_id)
    api = await make_client()
    value = await token("image:read")
    resumed = await finished(api, value, {"id": ids[0]})
    given_up = await finished(api, value, {"id": ids[1]})
    assert resumed["download"]["error"] is None
    assert resumed["download"]["finished_at"] is not None
    assert given_up["download"]["error"] == "download interrupted by server restarts"
    resp = await api.get(f"/api/images/{ids[0]}", headers={**bearer(value), "Accept": QEMU_DISK})
    assert await resp.read() == QCOW2
    assert origin.authorizations == [None]


async def test_a_download_runs_in_one_process_and_moves_when_that_one_dies(
    make_client: MakeClient,
    alice: User,
    token: MakeToken,
    origin: Origin,
    pool: asyncpg.Pool,
    config: Config,
    monkeypatch: pytest.MonkeyPatch,
):
    """Two API processes: the second does not start a download the first holds; when the
    first goes (its lease runs out), the second takes it over without a restart."""
    monkeypatch.setattr(downloads, "RESUME_EVERY", 0.2)
    first, second = await make_client(), await make_client()
    cipher = Cipher(config.crypto.key)
    url = origin.url("/disk.qcow2")
    async with pool.acquire() as conn:
        image_id = await images.create(conn, alice, None, "qemu", "shared", None)
        await images.add_download(conn, image_id, url, images.seal_url(cipher, image_id, url))
    origin.gate.clear()
    first.app[DOWNLOADS].start(image_id)
    await origin.requested.wait()
    second.app[DOWNLOADS].start(image_id)
    await second.app[DOWNLOADS].join()  # claimed elsewhere: nothing to do
    await asyncio.sleep(0.5)  # a few of the second's periodic looks
    assert len(origin.authorizations) == 1
    # The first dies mid-download without a word: its lease is all that is left of it.
    first.app[DOWNLOADS]._tasks[image_id].cancel()
    await first.app[DOWNLOADS].join()
    await pool.execute("UPDATE image_downloads SET lease_expires_at = now() - interval '1 second'")
    origin.gate.set()
    for _ in range(100):  # the second's next periodic look (every 0.2 s here)
        if await pool.fetchval("SELECT finished_at IS NOT NULL FROM image_downloads"):
            break
        await asyncio.sleep(0.1)
    value = await token("image:read")
    done = await finished(second, value, {"id": image_id})
    assert done["download"]["error"] is None and done["download"]["finished_at"] is not None
    assert len(origin.authorizations) == 2
    assert await pool.fetchval("SELECT attempts FROM image_downloads") == 2


async def test_deleting_an_image_cancels_its_download(
    api: TestClient, alice: User, token: MakeToken, origin: Origin, pool: asyncpg.Pool, blob_files
):
    value = await token(EVERYTHING)
    origin.gate.clear()
    body = await start_download(api, value, name="slow", download_url=origin.url("/disk.qcow2"))
    await origin.requested.wait()
    resp = await api.delete(f"/api/images/{body['id']}", headers=bearer(value))
    assert resp.status == 204
    await api.app[DOWNLOADS].join()
    assert await pool.fetchval("SELECT count(*) FROM images") == 0
    assert await pool.fetchval("SELECT count(*) FROM image_downloads") == 0
    assert blob_files() == []


async def test_show_image_access(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken
):
    mine = await token(EVERYTHING)
    bob = await make_user("bob")
    bobs = await token("image:read", user=bob)
    bob_no_scope = await token("namespace:read", user=bob)
    for name, visibility in (("priv", "private"), ("inter", "internal"), ("pub", "public")):
        await create_namespace(api, mine, name, visibility=visibility)
    personal = await create_image(api, mine, QCOW2, name="personal")
    priv = await create_image(api, mine, QCOW2, name="i", namespace="priv")
    inter = await create_image(api, mine, QCOW2, name="i", namespace="inter")
    pub = await create_image(api, mine, QCOW2, name="i", namespace="pub")

    async def status(image: dict[str, Any], headers: dict[str, str]) -> int:
        return (await api.get(f"/api/images/{image['id']}", headers=headers)).status

    for image in (personal, priv, inter, pub):
        assert await status(image, bearer(mine)) == 200
    assert await status(personal, bearer(bobs)) == 404
    assert await status(priv, bearer(bobs)) == 404
    assert await status(inter, bearer(bobs)) == 200
    assert await status(inter, bearer(bob_no_scope)) == 404
    assert await status(inter, {}) == 404
    assert await status(pub, {}) == 200
    assert await status(pub, bearer(bob_no_scope)) == 200
    resp = await api.get(f"/api/images/{pub['id']}", headers={"Accept": QEMU_DISK})
    assert await resp.read() == QCOW2
    for path in ("/api/images/424242", "/api/images/" + "9" * 30, "/api/images/abc"):
        assert (await api.get(path, headers=bearer(mine))).status == 404


async def test_delete_image(
    api: TestClient,
    alice: User,
    make_user: MakeUser,
    token: MakeToken,
    pool: asyncpg.Pool,
    blob_files,
):
    mine = await token(EVERYTHING)
    bob, carol = await make_user("bob"), await make_user("carol")
    bobs = await token(EVERYTHING, user=bob)
    carols = await token("image:read,delete", user=carol)
    await create_namespace(api, mine, "team", visibility="public")
    await add_collaborator(api, mine, "team", "alice", bobs, "bob")
    personal = await create_image(api, mine, QCOW2, name="mine")
    team = await create_image(api, mine, QCOW2, name="team", namespace="team")
    for target, headers in (
        (personal, bearer(bobs)),
        (team, bearer(carols)),
        (team, bearer(await token("image:read,write"))),
        (team, {}),
    ):
        resp = await api.delete(f"/api/images/{target['id']}", headers=headers)
        assert resp.status == 404
    assert len(blob_files()) == 2
    resp = await api.delete(f"/api/images/{team['id']}", headers=bearer(bobs))  # collaborator
    assert resp.status == 204
    assert await resp.read() == b""
    resp = await api.delete(f"/api/images/{personal['id']}", headers=bearer(mine))
    assert resp.status == 204
    assert await pool.fetchval("SELECT count(*) FROM images") == 0
    assert blob_files() == []


async def test_delete_removes_the_content_on_both_backends(
    storage_api: TestClient, alice: User, token: MakeToken, stored_blobs
):
    value = await token(EVERYTHING)
    body = await create_image(storage_api, value, ARCHIVE, name="alpine", driver="docker")
    assert len(stored_blobs()) == 1
    assert (
        await storage_api.delete(f"/api/images/{body['id']}", headers=bearer(value))
    ).status == 204
    assert stored_blobs() == []


async def test_list_images(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken, origin: Origin
):
    mine = await token(EVERYTHING)
    bob = await make_user("bob")
    bobs = await token(EVERYTHING, user=bob)
    await create_namespace(api, mine, "acme", visibility="public")
    await create_namespace(api, mine, "child", parent="acme")
    await create_namespace(api, bobs, "shared")
    await create_namespace(api, bobs, "open", visibility="public")
    await add_collaborator(api, bobs, "shared", "bob", mine, "alice")
    b = await create_image(api, mine, QCOW2, name="b-personal")
    a = await start_download(
        api, mine, name="a-team", namespace="acme", download_url=origin.url("/disk.qcow2")
    )
    c = await create_image(api, bobs, ARCHIVE, name="c-shared", namespace="shared", driver="docker")
    await create_image(api, mine, QCOW2, name="nested", namespace="acme/child")
    await create_image(api, bobs, QCOW2, name="d-bobs")
    await create_image(api, bobs, QCOW2, name="e-open", namespace="open")
    a = await finished(api, mine, a)

    resp = await api.get("/api/images", headers=bearer(mine), params={"search": "-"})
    assert resp.status == 200
    assert await resp.json() == [a, b, c]
    assert resp.headers["Link"] == (
        f'<{BASE}/images?page=1&search=->; rel="prev", <{BASE}/images?page=1&search=->; rel="next"'
    )
    for headers in (bearer(mine), bearer(await token("image:read", user=bob)), {}):
        resp = await api.get("/api/n/alice/acme/-/images", headers=headers)
        assert resp.status == 200
        assert await resp.json() == [a]
    resp = await api.get("/api/n/alice/acme/-/images", params={"search": "B"})
    assert await resp.json() == []
    assert (await api.get("/api/n/bob/shared/-/images")).status == 404
    resp = await api.get("/api/n/bob/shared/-/images", headers=bearer(mine))
    assert await resp.json() == [c]
    for headers in (bearer(await token("namespace:read")), {}):
        assert (await api.get("/api/images", headers=headers)).status == 404


async def test_listings_are_paginated(api: TestClient, alice: User, token: MakeToken):
    value = await token(EVERYTHING)
    await create_namespace(api, value, "acme")
    for i in range(26):
        await create_image(api, value, QCOW2, name=f"img{i:02}", namespace="acme")
    for path in ("/api/images", "/api/n/alice/acme/-/images"):
        resp = await api.get(path, headers=bearer(value), params={"page": "9"})
        assert [i["name"] for i in await resp.json()] == ["img25"]
        url = BASE + path.removeprefix("/api")
        assert resp.headers["Link"] == f'<{url}?page=1>; rel="prev", <{url}?page=2>; rel="next"'


async def test_collaborator_uploads_into_owners_namespace(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken
):
    bob = await make_user("bob")
    mine, bobs = await token(EVERYTHING), await token(EVERYTHING, user=bob)
    ns = await create_namespace(api, mine, "team")
    await add_collaborator(api, mine, "team", "alice", bobs, "bob")
    body = await create_image(api, bobs, QCOW2, name="shared", namespace="team@alice")
    assert body == expected(body, alice, "shared", author=bob, ns=ns)


async def test_deleting_a_namespace_detaches_its_images(
    api: TestClient, alice: User, token: MakeToken, pool: asyncpg.Pool
):
    value = await token(EVERYTHING)
    await create_namespace(api, value, "acme")
    await create_namespace(api, value, "child", parent="acme")
    nested = await create_image(api, value, QCOW2, name="same", namespace="acme/child")
    personal = await create_image(api, value, QCOW2, name="same")
    assert (await api.delete("/api/n/alice/acme", headers=bearer(value))).status == 204
    resp = await api.get(f"/api/images/{nested['id']}", headers=bearer(value))
    assert await resp.json() == {**nested, "namespace_id": None, "namespace": None}
    listed = await (await api.get("/api/images", headers=bearer(value))).json()
    assert sorted(i["id"] for i in listed) == sorted([nested["id"], personal["id"]])
    resp = await upload(api, value, QCOW2, name="same")
    assert await resp.json() == {"name": ["Name already exists"]}
    await api.delete(f"/api/images/{personal['id']}", headers=bearer(value))
    await create_image(api, value, QCOW2, name="same")
    assert await pool.fetchval("SELECT count(*) FROM images WHERE detached") == 1


async def test_find_docker_image_for_a_build(
    api: TestClient, alice: User, make_user: MakeUser, token: MakeToken, pool: asyncpg.Pool
):
    value = await token(EVERYTHING)
    ns = await create_namespace(api, value, "acme")
    personal = await create_image(api, value, ARCHIVE, name="alpine:3.19", driver="docker")
    team = await create_image(
        api, value, ARCHIVE, name="alpine:3.19", namespace="acme", driver="docker"
    )
    await create_image(api, value, QCOW2, name="debian")
    bob = await make_user("bob")
    async with pool.acquire() as conn:
        keys = dict(await conn.fetch("SELECT id, blob_key FROM images"))
        found = await images.find_docker_image(conn, alice.id, None, "alpine:3.19")
        assert found is not None and found.image_id == personal["id"]
        assert found.blob_key == keys[personal["id"]]
        assert found.sha256 == hashlib.sha256(ARCHIVE).hexdigest()
        found = await images.find_docker_image(conn, alice.id, ns["id"], "alpine:3.19")
        assert found is not None and found.image_id == team["id"]
        for owner, namespace_id, name in (
            (alice.id, None, "alpine"),  # exact names only
            (alice.id, None, "debian"),  # a qemu image
            (bob.id, None, "alpine:3.19"),  # someone else's
        ):
            assert await images.find_docker_image(conn, owner, namespace_id, name) is None


# sftp downloads: a real asyncssh SFTP server on 127.0.0.1.

SFTP_USER = "us@er"  # percent-encoded in URLs, like the password
SFTP_PASSWORD = f"{PASSWORD}/:@%"


class PasswordServer(asyncssh.SSHServer):
    """Password logins only, for SFTP_USER with SFTP_PASSWORD; records each attempt."""

    def __init__(self, logins: list[tuple[str, str]]) -> None:
        self.logins = logins

    def begin_auth(self, username: str) -> bool:
        return True  # authentication is required

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        self.logins.append((username, password))
        return (username, password) == (SFTP_USER, SFTP_PASSWORD)


@dataclasses.dataclass
class SftpSource:
    """An SFTP server on 127.0.0.1 serving `root` (chrooted): disk.qcow2, big.qcow2, text."""

    root: Path
    port: int
    logins: list[tuple[str, str]]

    def url(self, path: str, password: str = SFTP_PASSWORD, query: str = "") -> str:
        user = f"{quote(SFTP_USER, safe='')}:{quote(password, safe='')}"
        return f"sftp://{user}@127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")


@pytest.fixture
async def sftp_source(tmp_path: Path) -> AsyncIterator[SftpSource]:
    root = tmp_path / "sftp"
    root.mkdir()
    (root / "disk.qcow2").write_bytes(QCOW2)
    (root / "big.qcow2").write_bytes(QCOW2 * 4)
    (root / "text").write_text("hello, not a disk")
    logins: list[tuple[str, str]] = []
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        config=None,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        server_factory=lambda: PasswordServer(logins),
        sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=bytes(root)),
        allow_scp=False,
    )
    yield SftpSource(root, server.get_port(), logins)
    server.close()
    await server.wait_closed()


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_sftp_download_is_byte_identical_and_never_shows_the_password(
    storage_api: TestClient,
    alice: User,
    token: MakeToken,
    sftp_source: SftpSource,
    pool: asyncpg.Pool,
    stored_blobs,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.DEBUG)
    value = await token(EVERYTHING)
    url = sftp_source.url("/disk.qcow2", query="timeout=30s")
    body = await start_download(storage_api, value, name="remote", download_url=url)
    source = f"sftp://us%40er:xxxxx@127.0.0.1:{sftp_source.port}/disk.qcow2?timeout=30s"
    pending = {"source": source, "error": None, "created_at": body["download"]["created_at"]}
    assert body == expected(
        body, alice, "remote", download={**pending, "started_at": None, "finished_at": None}
    )

    done = await finished(storage_api, value, body)
    assert done["download"]["started_at"].endswith("Z")
    assert done["download"]["finished_at"].endswith("Z")
    assert done == expected(
        body,
        alice,
        "remote",
        download={
            **pending,
            "started_at": done["download"]["started_at"],
            "finished_at": done["download"]["finished_at"],
        },
    )
    assert sftp_source.logins == [(SFTP_USER, SFTP_PASSWORD)]  # percent-decoded
    resp = await storage_api.get(
        f"/api/images/{body['id']}", headers={**bearer(value), "Accept": QEMU_DISK}
    )
    assert resp.status == 200
    assert resp.content_type == QEMU_DISK
    assert await resp.read() == QCOW2
    assert len(stored_blobs()) == 1
    dump = await pool.fetchval("SELECT string_agg(d::text, '') FROM image_downloads d")
    assert PASSWORD not in dump
    texts = [json.dumps(body)]
    for path in ("/api/images", f"/api/images/{body['id']}"):
        texts.append(await (await storage_api.get(path, headers=bearer(value))).text())
    assert all(PASSWORD not in text and source in text for text in texts)
    assert "downloaded" in caplog.text
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize(
    ("path", "password", "query", "error"),
    [
        ("/disk.qcow2", f"wrong-{PASSWORD}", "", "download failed: authentication failed"),
        ("/missing.qcow2", SFTP_PASSWORD, "", "download failed: no such file /missing.qcow2"),
        ("/text", SFTP_PASSWORD, "", "not a valid qcow2 file"),
        ("/big.qcow2", SFTP_PASSWORD, "", "file too large, cannot exceed 8 KB"),
        ("/disk.qcow2", SFTP_PASSWORD, "timeout=soon", "download failed: invalid timeout soon"),
    ],
)
async def test_failed_sftp_downloads_record_their_error(
    make_client: MakeClient,
    alice: User,
    token: MakeToken,
    sftp_source: SftpSource,
    blob_files,
    caplog: pytest.LogCaptureFixture,
    path: str,
    password: str,
    query: str,
    error: str,
):
    caplog.set_level(logging.DEBUG)
    api = await make_client(max_size=8192)
    value = await token("image:read,write")
    url = sftp_source.url(path, password, query)
    body = await start_download(api, value, name="broken", download_url=url)
    done = await finished(api, value, body)
    assert done["download"]["error"] == error
    assert done["download"]["finished_at"] is not None
    resp = await api.get(
        f"/api/images/{body['id']}", headers={**bearer(value), "Accept": QEMU_DISK}
    )
    assert resp.status == 404
    assert blob_files() == []
    assert PASSWORD not in json.dumps(done)
    assert PASSWORD not in caplog.text


async def test_sftp_connect_refused_records_a_connection_error(
    api: TestClient, alice: User, token: MakeToken
):
    value = await token("image:read,write")
    port = closed_port()
    url = f"sftp://me:{PASSWORD}@127.0.0.1:{port}/disk.qcow2?timeout=1s"
    body = await start_download(api, value, name="far", download_url=url)
    done = await finished(api, value, body)
    error = done["download"]["error"]  # e.g. "[Errno 111] Connect call failed (...)" on Linux
    assert error.startswith("download failed: ")
    assert error.endswith(f"Connect call failed ('127.0.0.1', {port})")
    assert PASSWORD not in json.dumps(done)


async def test_sftp_connect_timeout_comes_from_the_url(
    api: TestClient, alice: User, token: MakeToken
):
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never speaks SSH
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        value = await token("image:read,write")
        url = f"sftp://me:{PASSWORD}@127.0.0.1:{port}/disk.qcow2?timeout=1s"
        body = await start_download(api, value, name="mute", download_url=url)
        done = await finished(api, value, body)
    finally:
        server.close()
        await server.wait_closed()
    assert done["download"]["error"] == "download failed: connect timed out after 1 seconds"
