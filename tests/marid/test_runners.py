"""marid/runners.py: runners announce themselves, withdraw when they stop, stop counting when
their announcements go stale, and the presence loop rides out a database outage (issue 12
part 3, docs/architecture.md §1)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from marid import __version__, db, runners
from marid.pgcluster import Cluster
from marid.runners import Offer
from tests.fixtures.outage import start_database, stop_database

WAIT, STEP = 60.0, 0.05  # a bound on every wait, and the polling step


async def until(what: str, condition: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(int(WAIT / STEP)):
        if await condition():
            return
        await asyncio.sleep(STEP)
    raise AssertionError(f"still waiting after {WAIT:g}s for {what}")


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as connection:
        yield connection


async def names(conn: asyncpg.Connection) -> list[str]:
    return [r["name"] for r in await conn.fetch("SELECT name FROM runners ORDER BY name")]


async def age(conn: asyncpg.Connection, name: str, seconds: float) -> None:
    """Make runner `name`'s last announcement `seconds` old."""
    await conn.execute(
        "UPDATE runners SET last_seen_at = now() - make_interval(secs => $2) WHERE name = $1",
        name,
        seconds,
    )


async def test_no_runner_offers_nothing(conn: asyncpg.Connection):
    assert await runners.offered(conn) == Offer(0, frozenset())


async def test_announced_runners_offer_their_drivers_together(conn: asyncpg.Connection):
    await runners.announce(conn, "a", ["docker", "os"], 2)
    await runners.announce(conn, "b", ["docker", "qemu"], 1)
    await runners.announce(conn, "c", [], 1)  # alive, claims nothing
    assert await runners.offered(conn) == Offer(3, frozenset({"docker", "os", "qemu"}))


async def test_announcing_again_updates_the_row_and_keeps_its_start(conn: asyncpg.Connection):
    await runners.announce(conn, "a", ["docker"], 2, interval=10.0)
    first = await conn.fetchrow("SELECT * FROM runners")
    await age(conn, "a", 5.0)
    await runners.announce(conn, "a", ["docker", "qemu"], 4, interval=1.5)
    row = await conn.fetchrow("SELECT * FROM runners")
    assert (row["drivers"], row["parallelism"], row["announce_interval"]) == (
        ["docker", "qemu"],
        4,
        1.5,
    )
    assert row["started_at"] == first["started_at"]
    assert row["last_seen_at"] > first["last_seen_at"]  # made 5 s old, then seen again
    assert row["version"] == __version__
    assert await names(conn) == ["a"]


async def test_a_withdrawn_runner_offers_nothing(conn: asyncpg.Connection):
    await runners.announce(conn, "a", ["qemu"], 1)
    await runners.announce(conn, "b", ["docker"], 1)
    await runners.withdraw(conn, "a")
    assert await names(conn) == ["b"]
    assert await runners.offered(conn) == Offer(1, frozenset({"docker"}))


async def test_a_runner_is_alive_for_three_of_its_intervals(conn: asyncpg.Connection):
    await runners.announce(conn, "late", ["qemu"], 1, interval=10.0)
    await runners.announce(conn, "gone", ["os"], 1, interval=10.0)
    await age(conn, "late", 25.0)  # two announcements missed: still alive
    await age(conn, "gone", 31.0)
    assert await runners.offered(conn) == Offer(1, frozenset({"qemu"}))


async def test_dead_runners_are_forgotten_an_hour_after_their_last_announcement(
    conn: asyncpg.Connection,
):
    for name in ("alive", "dead", "long-dead"):
        await runners.announce(conn, name, ["docker"], 1, interval=10.0)
    await age(conn, "dead", 60.0)
    await age(conn, "long-dead", runners.FORGET_AFTER + 1)
    assert await runners.forget(conn) == 1
    assert await names(conn) == ["alive", "dead"]


async def test_a_runner_with_a_long_interval_is_not_forgotten_while_alive(
    conn: asyncpg.Connection,
):
    await runners.announce(conn, "slow", ["docker"], 1, interval=runners.FORGET_AFTER)
    await age(conn, "slow", runners.FORGET_AFTER + 1)
    assert await runners.forget(conn) == 0
    assert await runners.offered(conn) == Offer(1, frozenset({"docker"}))


async def test_the_presence_loop_announces_forgets_and_withdraws_when_stopped(
    pool: asyncpg.Pool, conn: asyncpg.Connection
):
    await runners.announce(conn, "long-dead", ["docker"], 1)
    await age(conn, "long-dead", runners.FORGET_AFTER + 1)
    stop = asyncio.Event()
    loop = asyncio.create_task(runners.run(pool, "r1", ["docker", "qemu"], 3, stop, 0.05))

    async def announced_twice() -> bool:
        row = await conn.fetchrow("SELECT started_at, last_seen_at FROM runners WHERE name = 'r1'")
        return row is not None and row["last_seen_at"] > row["started_at"]

    await until("a second announcement", announced_twice)
    assert await names(conn) == ["r1"]  # the long-dead runner is forgotten
    row = await conn.fetchrow("SELECT drivers, parallelism FROM runners")
    assert (row["drivers"], row["parallelism"]) == (["docker", "qemu"], 3)
    stop.set()
    await asyncio.wait_for(loop, WAIT)
    assert await names(conn) == []


async def test_a_cancelled_presence_loop_withdraws(pool: asyncpg.Pool, conn: asyncpg.Connection):
    stop = asyncio.Event()
    loop = asyncio.create_task(runners.run(pool, "r1", ["os"], 1, stop, 30.0))

    async def announced() -> bool:
        return await names(conn) == ["r1"]

    await until("the announcement", announced)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    assert await names(conn) == []


async def test_the_presence_loop_survives_a_database_outage_and_announces_after_it(
    outage_cluster: Cluster, outage_dsn: str, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="marid.runners")
    pool = await db.create_pool(outage_dsn, size=2, connect=False)
    stop = asyncio.Event()
    loop = asyncio.create_task(runners.run(pool, "r1", ["qemu"], 1, stop, 0.05))

    async def query(sql: str) -> object:
        conn = await asyncpg.connect(outage_dsn)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    async def logged(words: str) -> bool:
        return any(words in r.getMessage() for r in caplog.records)

    try:
        await until("the announcement", lambda: _true(query("SELECT count(*) FROM runners")))
        await stop_database(outage_cluster)
        await until("a failed announcement", lambda: logged("presence failed"))
        await start_database(outage_cluster)
        back = await query("SELECT now()")

        async def announced_again() -> bool:
            seen = await query("SELECT last_seen_at FROM runners WHERE name = 'r1'")
            return seen is not None and seen >= back  # type: ignore[operator]

        await until("an announcement after the outage", announced_again)
        await until("the end of the outage logged", lambda: logged("presence works again"))
        assert not loop.done()
        failures = [r for r in caplog.records if "presence failed" in r.getMessage()]
        assert len(failures) == 1  # once per outage, not once per try
        stop.set()
        await asyncio.wait_for(loop, WAIT)
        assert await query("SELECT count(*) FROM runners") == 0
    finally:
        stop.set()
        await asyncio.gather(loop, return_exceptions=True)
        await pool.close()


async def _true(value: Awaitable[object]) -> bool:
    return bool(await value)
