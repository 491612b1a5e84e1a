"""Image downloads under the outbound policy (docs/api.md §12.3, docs/security.md §3): loopback
spellings refused at POST time and downloaded when allowed, redirects checked one by one, and
refusals that tell nothing of the port. Every server here is on loopback; nothing else is
connected to (the other refused addresses are refused before any connection)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from marid import config as config_module
from marid import images
from marid.api.app import create_app
from marid.api.downloads import DOWNLOADS, MAX_REDIRECTS
from marid.config import Config
from marid.crypto import Cipher
from marid.users import User
from tests.api.test_images import QCOW2, finished, with_downloads
from tests.conftest import MakeToken, bearer

MakeApi = Callable[..., Awaitable[TestClient]]
SCOPES = "image:read,write"


def refused(host: str, reason: str = "loopback") -> str:
    return f"{host} is refused by policy ({reason}); see outbound.allow"


@dataclasses.dataclass
class Origin:
    """A download source: /disk.qcow2, /to?url=<Location> (a 302), /loop (to itself); every
    request is recorded as (path, Authorization)."""

    port: int = 0
    requests: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)

    def app(self) -> web.Application:
        async def disk(request: web.Request) -> web.Response:
            self.requests.append((request.path, request.headers.get("Authorization")))
            return web.Response(body=QCOW2)

        async def to(request: web.Request) -> web.Response:
            self.requests.append((request.path, request.headers.get("Authorization")))
            raise web.HTTPFound(request.query["url"])

        async def loop(request: web.Request) -> web.Response:
            self.requests.append((request.path, request.headers.get("Authorization")))
            raise web.HTTPFound("/loop")

        app = web.Application()
        app.router.add_get("/disk.qcow2", disk)
        app.router.add_get("/to", to)
        app.router.add_get("/loop", loop)
        return app


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    """An origin on 127.0.0.1."""
    found = Origin()
    async with TestServer(found.app(), host="127.0.0.1") as server:
        found.port = server.port or 0
        yield found


@pytest.fixture
async def second() -> AsyncIterator[Origin]:
    """Another origin, on 127.0.0.2 (Linux routes all of 127.0.0.0/8 to loopback)."""
    found = Origin()
    async with TestServer(found.app(), host="127.0.0.2") as server:
        found.port = server.port or 0
        yield found


@pytest.fixture
def make_api(aiohttp_client: Any, config: Config, pool: asyncpg.Pool) -> MakeApi:
    """`await make_api(allow=[...])`: an API client running downloads under that policy."""

    async def make(allow: list[str] | None = None) -> TestClient:
        cfg = dataclasses.replace(config, outbound=config_module.OutboundConfig(allow or []))
        client: TestClient = await aiohttp_client(with_downloads(create_app(cfg, pool)))
        return client

    return make


async def download(api: TestClient, token: str, url: str, name: str = "disk") -> Any:
    """The image once its download of `url` has ended."""
    body = {"name": name, "download_url": url}
    resp = await api.post("/api/images", headers=bearer(token), json=body)
    assert resp.status == 201, await resp.text()
    return await finished(api, token, await resp.json())


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


LOOPBACK_SPELLINGS = [
    ("127.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("0x7f.0.0.1", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("localhost", "localhost"),
]


@pytest.mark.parametrize(
    ("host", "shown", "reason"),
    [
        *((host, shown, "loopback") for host, shown in LOOPBACK_SPELLINGS),
        ("[::1]", "::1", "loopback"),
        ("10.0.0.1", "10.0.0.1", "private"),
        ("172.16.5.4", "172.16.5.4", "private"),
        ("192.168.1.1", "192.168.1.1", "private"),
        ("100.64.0.1", "100.64.0.1", "private"),
        ("169.254.169.254", "169.254.169.254", "link-local"),
        ("2852039166", "169.254.169.254", "link-local"),
        ("[fe80::1]", "fe80::1", "link-local"),
        ("[fd00::1]", "fd00::1", "unique-local"),
        ("[::ffff:10.0.0.1]", "::ffff:a00:1", "private"),
        ("0.0.0.0", "0.0.0.0", "unspecified"),
        ("224.0.0.1", "224.0.0.1", "multicast"),
    ],
)
async def test_a_refused_literal_is_a_field_error(
    make_api: MakeApi, alice: User, token: MakeToken, pool: asyncpg.Pool, host: str, shown: str,
    reason: str,
):  # fmt: skip
    api = await make_api()
    value = await token(SCOPES)
    for url in (f"http://{host}:8080/disk.qcow2", f"sftp://me:pw@{host}/disk.qcow2"):
        resp = await api.post(
            "/api/images", headers=bearer(value), json={"name": "disk", "download_url": url}
        )
        assert (resp.status, await resp.json()) == (
            400,
            {"download_url": [f"Download URL {refused(shown, reason)}"]},
        )
    assert await pool.fetchval("SELECT count(*) FROM images") == 0


@pytest.mark.parametrize(("host", "shown"), LOOPBACK_SPELLINGS)
async def test_the_same_spellings_download_when_loopback_is_allowed(
    make_api: MakeApi, alice: User, token: MakeToken, origin: Origin, host: str, shown: str
):
    api = await make_api(["127.0.0.0/8"])
    value = await token(SCOPES)
    done = await download(api, value, f"http://{host}:{origin.port}/disk.qcow2")
    assert done["download"]["error"] is None
    resp = await api.get(
        f"/api/images/{done['id']}",
        headers={**bearer(value), "Accept": "application/x-qemu-disk"},
    )
    assert await resp.read() == QCOW2
    assert origin.requests == [("/disk.qcow2", None)]


async def test_ipv6_loopback_downloads_when_allowed(
    make_api: MakeApi, alice: User, token: MakeToken
):
    found = Origin()
    try:
        server = TestServer(found.app(), host="::1")
        await server.start_server()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        value = await token(SCOPES)
        url = f"http://[::1]:{server.port}/disk.qcow2"
        strict = await make_api(["127.0.0.0/8"])  # IPv4 loopback only
        resp = await strict.post(
            "/api/images", headers=bearer(value), json={"name": "v6", "download_url": url}
        )
        assert await resp.json() == {"download_url": [f"Download URL {refused('::1')}"]}
        done = await download(await make_api(["::1"]), value, url)
        assert done["download"]["error"] is None
    finally:
        await server.close()
    assert found.requests == [("/disk.qcow2", None)]


@pytest.mark.parametrize("allow", ["127.0.0.2/32", "localhost"])
@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("http://127.0.0.1:{open}/disk.qcow2", refused("127.0.0.1")),
        ("http://127.0.0.1:{closed}/disk.qcow2", refused("127.0.0.1")),
        ("http://2130706433:{open}/disk.qcow2", refused("127.0.0.1")),
        ("http://[::ffff:127.0.0.1]:{open}/disk.qcow2", refused("::ffff:7f00:1")),
        ("http://10.0.0.1:{open}/disk.qcow2", refused("10.0.0.1", "private")),
        ("http://169.254.169.254/latest/meta-data/", refused("169.254.169.254", "link-local")),
    ],
)
async def test_a_redirect_to_a_refused_address_is_refused(
    make_api: MakeApi, alice: User, token: MakeToken, origin: Origin, second: Origin,
    allow: str, target: str, error: str,
):  # fmt: skip
    """Allowed: exactly the first server, by address (127.0.0.2/32) or by name (localhost,
    which resolves to 127.0.0.1 here); its redirect elsewhere is refused before connecting,
    and an open port reads the same as a closed one."""
    api = await make_api([allow])
    value = await token(SCOPES)
    first = f"127.0.0.2:{second.port}" if allow != "localhost" else f"localhost:{origin.port}"
    to = target.format(open=origin.port, closed=closed_port())
    done = await download(api, value, f"http://{first}/to?url={to}")
    assert done["download"]["error"] == f"download failed: {error}"
    served = origin.requests if allow == "localhost" else second.requests
    assert served == [("/to", None)]  # the first request, and nothing after it
    if allow != "localhost":
        assert origin.requests == []


async def test_a_redirect_to_a_name_that_resolves_to_a_refused_address_is_refused(
    make_api: MakeApi, alice: User, token: MakeToken, origin: Origin, second: Origin
):
    """The name is checked at connection time, in the DNS answer the connection uses."""
    api = await make_api(["127.0.0.2/32"])
    value = await token(SCOPES)
    texts = []
    for port in (origin.port, closed_port()):
        to = f"http://localhost:{port}/disk.qcow2"
        done = await download(api, value, f"http://127.0.0.2:{second.port}/to?url={to}", f"d{port}")
        texts.append(done["download"]["error"])
    assert texts == [f"download failed: {refused('localhost')}"] * 2
    assert origin.requests == []


async def test_redirects_are_followed_up_to_a_limit_and_only_to_http(
    make_api: MakeApi, alice: User, token: MakeToken, origin: Origin
):
    api = await make_api(["127.0.0.0/8"])
    value = await token(SCOPES)
    base = f"http://127.0.0.1:{origin.port}"
    done = await download(api, value, f"{base}/to?url=/to%3Furl%3D/disk.qcow2", "twice")
    assert done["download"]["error"] is None
    assert [path for path, _ in origin.requests] == ["/to", "/to", "/disk.qcow2"]
    origin.requests.clear()
    done = await download(api, value, f"{base}/loop", "loop")
    assert done["download"]["error"] == f"download failed: more than {MAX_REDIRECTS} redirects"
    assert len(origin.requests) == MAX_REDIRECTS + 1
    done = await download(api, value, f"{base}/to?url=file:///etc/passwd", "file")
    assert done["download"]["error"] == (
        "download failed: redirect to a URL that is not http or https"
    )


async def test_credentials_follow_a_redirect_only_on_their_own_server(
    make_api: MakeApi, alice: User, token: MakeToken, origin: Origin, second: Origin
):
    api = await make_api(["127.0.0.0/8"])
    value = await token(SCOPES)
    auth = "Basic " + base64.b64encode(b"me:secret").decode()
    for number, host in enumerate(("127.0.0.1", "127.1")):  # one server, however it is spelled
        url = f"http://me:secret@{host}:{origin.port}/to?url=/disk.qcow2"
        assert (await download(api, value, url, f"same{number}"))["download"]["error"] is None
        assert origin.requests == [("/to", auth), ("/disk.qcow2", auth)]
        origin.requests.clear()
    elsewhere = f"http://127.0.0.2:{second.port}/disk.qcow2"
    url = f"http://me:secret@127.0.0.1:{origin.port}/to?url={elsewhere}"
    assert (await download(api, value, url, "other"))["download"]["error"] is None
    assert origin.requests == [("/to", auth)]
    assert second.requests == [("/disk.qcow2", None)]


@pytest.mark.parametrize("scheme", ["http", "sftp"])
async def test_a_download_saved_under_another_policy_is_refused_when_it_connects(
    make_api: MakeApi, alice: User, token: MakeToken, pool: asyncpg.Pool, config: Config,
    scheme: str,
):  # fmt: skip
    """Saved while loopback was allowed, run by a server that refuses it: nothing connects,
    and an open port reads the same as a closed one, for a literal and for a name."""
    connections = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    listener = await asyncio.start_server(count, "127.0.0.1", 0)
    open_port = listener.sockets[0].getsockname()[1]
    cipher = Cipher(config.crypto.key)
    userinfo = "me:pw@" if scheme == "sftp" else ""
    spellings = [("127.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("localhost", "localhost")]
    cases = {
        f"{scheme}://{userinfo}{host}:{port}/disk.qcow2": refused(shown)
        for host, shown in spellings
        for port in (open_port, closed_port())
    }
    try:
        ids = {}
        async with pool.acquire() as conn:
            for number, url in enumerate(cases):
                image_id = await images.create(conn, alice, None, "qemu", f"d{number}", None)
                await images.add_download(
                    conn, image_id, url, images.seal_url(cipher, image_id, url)
                )
                ids[url] = image_id
        api = await make_api()  # starts what is pending
        value = await token(SCOPES)
        await api.app[DOWNLOADS].join()
        for url, error in cases.items():
            done = await finished(api, value, {"id": ids[url]})
            assert done["download"]["error"] == f"download failed: {error}", url
    finally:
        listener.close()
        await listener.wait_closed()
    assert connections == 0
