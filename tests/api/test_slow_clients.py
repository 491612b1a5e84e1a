"""Slow clients against the real server (api/server.py), over raw TCP (issue 11 row 16):
`server.header_timeout` closes a connection whose request head does not come,
`server.body_timeout` ends a request whose body stops coming with 408, and a body that keeps
coming, however slowly, is served.

The timeouts are set to one second; nothing here asserts how long anything took, only that
it ends (each wait has a generous bound of its own)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from marid.api import server
from marid.config import Config
from tests.conftest import MakeToken

TIMEOUT = 1.0  # seconds: header_timeout and body_timeout of these tests
BOUND = 30.0  # seconds: how long a test waits for anything before it fails


@pytest.fixture
async def port(config: Config) -> AsyncIterator[int]:
    """The port of `marid serve`'s server (api/server.start) with one-second timeouts."""
    settings = dataclasses.replace(
        config.server, header_timeout=TIMEOUT, body_timeout=TIMEOUT, url="http://127.0.0.1"
    )
    sockets = server.bind("127.0.0.1", 0)
    runner: web.AppRunner = await server.start(
        dataclasses.replace(config, server=settings), sockets
    )
    try:
        yield sockets[0].getsockname()[1]
    finally:
        await runner.cleanup()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (fails after BOUND)."""
    return await asyncio.wait_for(reader.read(), BOUND)


async def test_half_a_request_line_is_disconnected(port: int):
    reader, writer = await connect(port)
    writer.write(b"GET /api/hea")
    await writer.drain()
    assert await until_closed(reader) == b""  # closed, nothing answered
    writer.close()


async def test_headers_that_stop_coming_are_disconnected(port: int):
    reader, writer = await connect(port)
    writer.write(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/js")
    await writer.drain()
    assert await until_closed(reader) == b""
    writer.close()


async def test_a_connection_that_sends_nothing_is_disconnected(port: int):
    reader, writer = await connect(port)
    assert await until_closed(reader) == b""
    writer.close()


async def test_a_body_that_stops_coming_ends_with_408(port: int):
    """The OAuth token endpoint reads its form body first, with no credentials needed."""
    reader, writer = await connect(port)
    writer.write(
        b"POST /login/oauth/token HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n"
        b"code=abc"
    )
    await writer.drain()
    answer = await until_closed(reader)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in head
    assert json.loads(body) == {"message": "Request body timed out: no data for too long"}
    writer.close()


async def test_a_chunked_json_body_that_stops_coming_ends_with_408(port: int, token: MakeToken):
    value = await token("namespace:write")
    reader, writer = await connect(port)
    writer.write(
        b"POST /api/namespaces HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        + f"Authorization: Bearer {value}\r\n\r\n".encode()
        + b'5\r\n{"nam\r\n'
    )
    await writer.drain()
    answer = await until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 408 ")
    writer.close()


async def test_an_unread_body_that_stops_coming_is_disconnected(
    port: int, caplog: pytest.LogCaptureFixture
):
    """Without a token the endpoint answers 404 before it reads the body; the server then
    reads the body's rest only while bytes keep coming."""
    reader, writer = await connect(port)
    writer.write(
        b"POST /api/namespaces HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"
    )
    await writer.drain()
    answer = await until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 404 ")
    writer.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_slow_but_steady_upload_succeeds(port: int, token: MakeToken):
    """Bytes every quarter of a second for three seconds, three times body_timeout."""
    value = await token("object:write")
    pieces = [f"piece {n} of a slow upload\n".encode() for n in range(12)]
    reader, writer = await connect(port)
    writer.write(
        b"POST /api/objects?name=slow.txt HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {value}\r\n".encode()
        + b"Content-Type: text/plain\r\nConnection: close\r\n"
        + f"Content-Length: {sum(map(len, pieces))}\r\n\r\n".encode()
    )
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(TIMEOUT / 4)
    answer = await until_closed(reader)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201 "), answer
    assert json.loads(body)["size"] == sum(map(len, pieces))
    writer.close()


async def test_a_slow_but_steady_chunked_json_body_succeeds(port: int, token: MakeToken):
    value = await token("namespace:write")
    text = json.dumps({"name": "slow", "description": "sent a few bytes at a time"}).encode()
    reader, writer = await connect(port)
    writer.write(
        b"POST /api/namespaces HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {value}\r\n".encode()
        + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    for start in range(0, len(text), 8):
        piece = text[start : start + 8]
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
        await asyncio.sleep(TIMEOUT / 4)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    answer = await until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 201 "), answer
    writer.close()


async def test_a_kept_alive_connection_serves_requests_until_it_idles(port: int):
    reader, writer = await connect(port)
    for _ in range(3):
        writer.write(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await asyncio.wait_for(reader.readexactly(length), BOUND)
    assert await until_closed(reader) == b""  # idle past header_timeout: closed
    writer.close()
