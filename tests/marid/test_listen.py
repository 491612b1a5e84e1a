"""marid/listen.py: a LISTEN connection that reconnects; its owner, having reached the
database, cuts the backoff short (docs/architecture.md §1, database outages)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg

from marid import listen
from marid.listen import Listener
from marid.pgcluster import Cluster
from tests.fixtures.outage import start_database, stop_database

WAIT, STEP = 60.0, 0.05  # a bound on waiting, far below the backoff the test sets


async def until(what: str, condition: Callable[[], bool]) -> None:
    for _ in range(int(WAIT / STEP)):
        if condition():
            return
        await asyncio.sleep(STEP)
    raise AssertionError(f"still waiting after {WAIT:g}s for {what}")


async def test_an_owner_back_at_the_database_cuts_the_listeners_backoff_short(
    outage_cluster: Cluster, outage_dsn: str
):
    heard: list[str] = []
    listener = Listener(outage_dsn, "marid_test", heard.append, lambda: None, first_retry=600.0)
    listening = asyncio.create_task(listener.run())
    try:
        await until("the first connection", lambda: listener.listening)
        assert listener.deaf_wait(5.0) == 5.0  # listening: NOTIFY wakes the owner

        await stop_database(outage_cluster)
        await until("the connection to be lost", lambda: listener.failures > 0)
        await start_database(outage_cluster)
        assert listener.deaf_wait(5.0) == listen.DEAF_POLL  # deaf: the owner polls meanwhile
        # ... and the reconnection comes now, not after the 600 s backoff.
        await until("the reconnection", lambda: listener.listening)

        conn = await asyncpg.connect(outage_dsn)
        try:
            await conn.execute("NOTIFY marid_test, 'again'")
        finally:
            await conn.close()
        await until("the notification", lambda: heard == ["again"])
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
