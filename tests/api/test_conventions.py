"""docs/api.md §1 conventions: errors, bodies, routing, pagination, health, request ids."""

import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request

from marid import db
from marid.api.app import create_app
from marid.api.http import Page
from marid.api.keys import API_PREFIX, CONFIG
from marid.config import Config
from marid.users import User
from tests.api.test_tokens import basic
from tests.conftest import MakeToken, bearer

Client = Callable[..., Awaitable[TestClient]]


async def test_malformed_json_is_a_400_message(api: TestClient, alice: User):
    resp = await api.post("/api/tokens", headers=basic(), data=b'{"name": ')
    assert resp.status == 400
    assert await resp.json() == {"message": "Malformed JSON body"}


async def test_invalid_utf8_body_is_malformed_json(api: TestClient, alice: User):
    resp = await api.post("/api/tokens", headers=basic(), data=b'{"name": "\xff"}')
    assert resp.status == 400
    assert await resp.json() == {"message": "Malformed JSON body"}


async def test_body_that_is_not_an_object_is_rejected(api: TestClient, alice: User):
    resp = await api.post("/api/tokens", headers=basic(), data=b"[1, 2]")
    assert resp.status == 400
    assert await resp.json() == {"message": "Body must be a JSON object"}


async def test_json_is_parsed_whatever_the_content_type(api: TestClient, alice: User):
    resp = await api.post(
        "/api/tokens",
        headers={**basic(), "Content-Type": "text/plain"},
        data=b'{"name": "plain"}',
    )
    assert resp.status == 201


async def test_wrong_field_type_is_field_keyed(api: TestClient, alice: User):
    resp = await api.post("/api/tokens", headers=basic(), json={"name": ["a"], "scope": True})
    assert resp.status == 400
    assert await resp.json() == {
        "name": ["Name must be a string"],
        "scope": ["Scope must be a string"],
    }


async def test_two_mebibyte_body_is_413(api: TestClient, alice: User, pool: asyncpg.Pool):
    big = b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    resp = await api.post("/api/tokens", headers=basic(), data=io.BytesIO(big))
    assert resp.status == 413
    assert await resp.json() == {"message": "Request body too large"}

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(32):
            yield b"x" * 65536 * 2

    resp = await api.post("/api/tokens", headers=basic(), data=chunked())
    assert resp.status == 413
    assert await resp.json() == {"message": "Request body too large"}
    assert await pool.fetchval("SELECT count(*) FROM tokens") == 0


async def test_unknown_path_trailing_slash_and_bad_ids_are_404(api: TestClient):
    for path in ("/api/nope", "/api/user/", "/api/tokens/abc"):
        resp = await api.get(path)
        assert resp.status == 404, path
        assert await resp.json() == {"message": "Not Found"}
    # Outside the API, the web interface's HTML 404 (tests/web/test_pages.py)
    resp = await api.get("/nope")
    assert resp.status == 404 and resp.content_type == "text/html"


async def test_wrong_method_is_405(api: TestClient):
    resp = await api.put("/api/user")
    assert resp.status == 405
    assert await resp.json() == {"message": "Method Not Allowed"}
    assert "GET" in resp.headers["Allow"]


async def crash(request: web.Request) -> web.Response:
    raise RuntimeError("secret internals: dsn=postgresql://u:pw@h/db")


async def crashing_client(client: Client, config: Config, pool: asyncpg.Pool) -> TestClient:
    app = create_app(config, pool)
    app.router.add_get("/crash", crash)
    return await client(app)


async def test_500_hides_internals(
    aiohttp_client: Client, config: Config, pool: asyncpg.Pool, caplog
):
    client = await crashing_client(aiohttp_client, config, pool)
    with caplog.at_level(logging.ERROR):
        resp = await client.get("/crash")
    assert resp.status == 500
    assert await resp.json() == {"message": "Internal Server Error"}
    assert "secret internals" in caplog.text  # logged once, server side


async def test_500_in_debug_mode_carries_a_stack(
    aiohttp_client: Client, debug_config: Config, pool: asyncpg.Pool
):
    client = await crashing_client(aiohttp_client, debug_config, pool)
    body = await (await client.get("/crash")).json()
    assert body["message"] == "Internal Server Error"
    assert "RuntimeError" in body["stack"]


async def test_requests_get_an_id_and_a_log_line(api: TestClient, token: MakeToken, caplog):
    value = await token()
    with caplog.at_level(logging.INFO, logger="marid.access"):
        resp = await api.get("/api/user?secret=shh", headers=bearer(value))
    request_id = resp.headers["X-Request-Id"]
    assert len(request_id) == 16
    assert "GET /api/user 200" in caplog.text
    assert "shh" not in caplog.text and value not in caplog.text
    echoed = await api.get("/api/user", headers={"X-Request-Id": "abc-123"})
    assert echoed.headers["X-Request-Id"] == "abc-123"


def page(query: str, total: int, config: Config) -> Page:
    app = web.Application()
    app[CONFIG] = config
    app[API_PREFIX] = "/api"
    request = make_mocked_request("GET", "/api/builds" + query, app=app)
    return Page(request, total)


def test_pagination_link_header(config: Config):
    p = page("?status=passed&page=2", 80, config)
    assert (p.number, p.offset, p.limit, p.last) == (2, 25, 25, 4)
    assert p.link == (
        '<https://ci.example.com/api/builds?page=1&status=passed>; rel="prev", '
        '<https://ci.example.com/api/builds?page=3&status=passed>; rel="next"'
    )


@pytest.mark.parametrize(
    ("query", "total", "number"),
    [("", 0, 1), ("?page=abc", 60, 1), ("?page=0", 60, 1), ("?page=99", 60, 3), ("?page=3", 75, 3)],
)
def test_pagination_clamps_the_page(query: str, total: int, number: int, config: Config):
    p = page(query, total, config)
    assert p.number == number
    assert f"page={max(1, number - 1)}" in p.link.split(",")[0]
    assert f"page={min(p.last, number + 1)}" in p.link.split(",")[1]


def test_pagination_keeps_the_first_of_repeated_parameters(config: Config):
    p = page("?tag=b&tag=a&page=1", 10, config)
    assert '<https://ci.example.com/api/builds?page=1&tag=b>; rel="next"' in p.link


async def test_health_ok(api: TestClient):
    resp = await api.get("/api/health")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "database": "ok", "version": "0.1.0"}


async def test_health_unavailable_when_the_database_is_gone(
    aiohttp_client: Client, config: Config, pg_cluster, template_db
):
    admin = await asyncpg.connect(pg_cluster.dsn())
    await admin.execute(f"CREATE DATABASE doomed TEMPLATE {template_db}")
    pool = await db.create_pool(pg_cluster.dsn("doomed"), size=1)
    try:
        client = await aiohttp_client(create_app(config, pool))
        await admin.execute("DROP DATABASE doomed WITH (FORCE)")
        resp = await client.get("/api/health")
        assert resp.status == 503
        assert await resp.json() == {
            "status": "unavailable",
            "database": "unavailable",
            "version": "0.1.0",
            "reason": "error",  # a missing database is no outage (tests/api/test_outage.py)
            "message": "The database is unavailable; try again shortly",
        }
    finally:
        pool.terminate()
        await admin.close()


async def test_text_postgres_cannot_store_is_a_400_not_a_500(
    api: TestClient, token: MakeToken, pool: asyncpg.Pool
):
    value = await token("namespace:read,write variable:write")
    for raw in (b'{"name": "ab\\u0000cd"}', b'{"name": "\\ud800abc"}', b'{"x\\u0000": 1}'):
        resp = await api.post("/api/namespaces", headers=bearer(value), data=raw)
        assert resp.status == 400, raw
        assert await resp.json() == {
            "message": "Body text must not contain NUL characters or unpaired surrogates"
        }
    resp = await api.get("/api/namespaces?search=%00", headers=bearer(value))
    assert resp.status == 400
    message = "Query parameter search must not contain NUL characters"
    assert await resp.json() == {"message": message}
    resp = await api.get("/api/n/alice%00/acme", headers=bearer(value))
    assert resp.status in (400, 404)
    assert await pool.fetchval("SELECT count(*) FROM namespaces") == 0
