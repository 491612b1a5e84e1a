"""A byte forwarder between a TCP port on 127.0.0.1 and a Unix socket, for the remote runner
tests (tests/faults/test_remote_runners.py): a runner started in a network namespace of its own
(only a loopback device) reaches the API through it, and nothing else on the host.

    python forward.py tcp-to-unix PORT SOCKET   # listen on 127.0.0.1:PORT, connect to SOCKET
    python forward.py unix-to-tcp SOCKET PORT   # listen on SOCKET, connect to 127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(ConnectionError, OSError):
        writer.close()


async def main(mode: str, listen: str, target: str) -> None:
    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if mode == "tcp-to-unix":
            return await asyncio.open_unix_connection(target)
        return await asyncio.open_connection("127.0.0.1", int(target))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await connect()
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    if mode == "tcp-to-unix":
        server = await asyncio.start_server(handle, "127.0.0.1", int(listen))
    else:
        server = await asyncio.start_unix_server(handle, listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
