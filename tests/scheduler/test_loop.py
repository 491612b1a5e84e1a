"""The scheduler loop with an injected clock (docs/api.md §11.2): exactly one build per run."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid import crons, submit
from marid.builds import Build
from marid.scheduler import loop
from marid.submit import Submission
from marid.users import User
from tests.conftest import MakeToken, MakeUser, bearer

MANIFEST = "driver: {type: docker, image: busybox, workspace: /w}\n"
NOW = datetime(2024, 3, 2, 0, 0, 5, tzinfo=UTC)


async def add_crons(
    pool: asyncpg.Pool,
    user: User,
    count: int,
    next_run: datetime,
    manifest: str = MANIFEST,
    schedule: str = "daily",
    prefix: str = "job",
) -> list[int]:
    """`count` cron jobs named `job 0`, `job 1`, … due at `next_run`."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """
            INSERT INTO crons (user_id, author_id, name, schedule, manifest, next_run)
            SELECT $1, $1, $6 || ' ' || i, $4, $2, $3 FROM generate_series(0, $5 - 1) AS i
            RETURNING id
            """,
            user.id,
            manifest,
            next_run,
            schedule,
            count,
            prefix,
        )
    return [row["id"] for row in rows]


async def builds_per_cron(pool: asyncpg.Pool) -> dict[int, int]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """
            SELECT c.id, count(b.id) AS n FROM crons c LEFT JOIN builds b ON b.cron_id = c.id
            GROUP BY c.id
            """
        )
    return {row["id"]: row["n"] for row in rows}


async def drain(pool: asyncpg.Pool, config: config_module.Config, now: datetime, batch: int) -> int:
    total = 0
    while claimed := await loop.tick(pool, now, batch, config):
        total += claimed
    return total


def test_comment_time_is_unpadded_english_utc():
    assert loop.comment_time(datetime(2024, 3, 2, tzinfo=UTC)) == "Sat Mar 2 00:00:00 2024"
    assert loop.comment_time(datetime(2024, 12, 25, 13, 4, 5, tzinfo=UTC)) == (
        "Wed Dec 25 13:04:05 2024"
    )


async def test_tick_creates_one_build_per_due_cron_and_moves_next_run_on(
    pool: asyncpg.Pool, config: config_module.Config, make_user: MakeUser
):
    alice = await make_user("alice")
    [due] = await add_crons(pool, alice, 1, datetime(2024, 3, 2, tzinfo=UTC))
    async with pool.acquire() as conn:
        await conn.execute("UPDATE crons SET name = 'nightly build' WHERE id = $1", due)
    [later] = await add_crons(pool, alice, 1, datetime(2024, 3, 3, tzinfo=UTC))
    assert await loop.tick(pool, NOW, 10, config) == 1
    assert await loop.tick(pool, NOW, 10, config) == 0
    async with pool.acquire() as conn:
        build = await conn.fetchrow(
            """
            SELECT user_id, author_id, trigger_type, trigger_comment, trigger_data::text,
                   status, manifest,
                   array(SELECT name FROM build_tags WHERE build_id = b.id) AS tags
            FROM builds b WHERE cron_id = $1
            """,
            due,
        )
        cron = await crons.get(conn, due)
        untouched = await crons.get(conn, later)
    assert dict(build) == {
        "user_id": alice.id,
        "author_id": alice.id,
        "trigger_type": "schedule",
        "trigger_comment": "nightly build: Scheduled build, next run Sat Mar 2 00:00:00 2024",
        "trigger_data": '{"email": "alice@example.com", "username": "alice"}',
        "status": "queued",
        "manifest": MANIFEST,
        "tags": ["cron:nightly-build"],
    }
    assert cron is not None and untouched is not None
    assert (cron.prev_run, cron.next_run) == (NOW, datetime(2024, 3, 3, tzinfo=UTC))
    assert (untouched.prev_run, untouched.next_run) == (None, datetime(2024, 3, 3, tzinfo=UTC))


async def test_a_run_missed_for_several_periods_fires_once(
    pool: asyncpg.Pool, config: config_module.Config, make_user: MakeUser
):
    alice = await make_user("alice")
    [cron_id] = await add_crons(pool, alice, 1, datetime(2024, 3, 2, tzinfo=UTC))
    now = datetime(2024, 3, 10, 12, tzinfo=UTC)  # eight daily runs later
    assert await drain(pool, config, now, 10) == 1
    assert await builds_per_cron(pool) == {cron_id: 1}
    async with pool.acquire() as conn:
        cron = await crons.get(conn, cron_id)
    assert cron is not None
    assert (cron.prev_run, cron.next_run) == (now, datetime(2024, 3, 11, tzinfo=UTC))


async def test_a_build_that_cannot_be_created_still_advances(
    pool: asyncpg.Pool, config: config_module.Config, make_user: MakeUser
):
    alice = await make_user("alice")
    qemu = "driver: {type: qemu, image: debian.qcow2}\n"  # config drivers: [docker] only
    [disabled] = await add_crons(pool, alice, 1, datetime(2024, 3, 2, tzinfo=UTC), qemu)
    bob = await make_user("bob")
    elsewhere = MANIFEST + "namespace: team@alice\n"  # bob is no collaborator of alice's
    [unusable] = await add_crons(pool, bob, 1, datetime(2024, 3, 2, tzinfo=UTC), elsewhere)
    [fine] = await add_crons(pool, bob, 1, datetime(2024, 3, 2, tzinfo=UTC), prefix="other")
    assert await loop.tick(pool, NOW, 10, config) == 3
    assert await builds_per_cron(pool) == {disabled: 0, unusable: 0, fine: 1}
    async with pool.acquire() as conn:
        for cron_id in (disabled, unusable):
            cron = await crons.get(conn, cron_id)
            assert cron is not None
            assert (cron.prev_run, cron.next_run) == (NOW, datetime(2024, 3, 3, tzinfo=UTC))
        assert await conn.fetchval("SELECT count(*) FROM cron_runs WHERE build_id IS NULL") == 2
        assert await conn.fetchval("SELECT count(*) FROM namespaces") == 0


async def test_a_run_already_recorded_never_makes_a_second_build(
    pool: asyncpg.Pool, config: config_module.Config, make_user: MakeUser
):
    """The unique (cron_id, scheduled_at) decides, even when the locks did not."""
    alice = await make_user("alice")
    due = datetime(2024, 3, 2, tzinfo=UTC)
    [cron_id] = await add_crons(pool, alice, 1, due)
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO cron_runs (cron_id, scheduled_at) VALUES ($1, $2)", cron_id, due
        )
    assert await loop.tick(pool, NOW, 10, config) == 1
    assert await builds_per_cron(pool) == {cron_id: 0}
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT next_run FROM crons") == datetime(2024, 3, 3, tzinfo=UTC)


async def test_three_concurrent_schedulers_create_exactly_one_build_per_due_cron(
    pool: asyncpg.Pool, config: config_module.Config, make_user: MakeUser
):
    people = [await make_user(f"user{i}") for i in range(4)]
    async with pool.acquire() as conn:  # owners interleaved: every batch needs every counter
        await conn.execute(
            """
            INSERT INTO crons (user_id, author_id, name, schedule, manifest, next_run)
            SELECT u, u, 'job ' || i, 'daily', $2, $3
            FROM generate_series(0, 999) AS i, LATERAL (SELECT ($1::bigint[])[1 + i % 4] AS u) o
            """,
            [person.id for person in people],
            MANIFEST,
            datetime(2024, 3, 2, tzinfo=UTC),
        )
    claimed = await asyncio.gather(*(drain(pool, config, NOW, 50) for _ in range(3)))
    assert sum(claimed) == 1000
    counts = await builds_per_cron(pool)
    assert len(counts) == 1000
    assert set(counts.values()) == {1}
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM builds") == 1000
        assert await conn.fetchval("SELECT count(*) FROM cron_runs") == 1000


async def test_a_scheduler_killed_mid_batch_leaves_no_run_fired_twice_or_lost(
    pool: asyncpg.Pool,
    config: config_module.Config,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
):
    alice = await make_user("alice")
    await add_crons(pool, alice, 100, datetime(2024, 3, 2, tzinfo=UTC))
    submit_many = loop.submit_many

    async def submit_then_die(conn: asyncpg.Connection, subs: list[Submission]) -> list[Build]:
        made = await submit_many(conn, subs)
        assert len(made) == 100  # the builds exist in the transaction when the backend dies
        async with pool.acquire() as other:  # as with kill -9 of the scheduler's connection
            await other.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        await conn.fetchval("SELECT 1")
        return made

    monkeypatch.setattr(loop, "submit_many", submit_then_die)
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
        await loop.tick(pool, NOW, 100, config)
    assert set((await builds_per_cron(pool)).values()) == {0}  # the batch rolled back
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM cron_runs") == 0
    monkeypatch.setattr(loop, "submit_many", submit_many)
    assert await drain(pool, config, NOW, 30) == 100
    assert set((await builds_per_cron(pool)).values()) == {1}


async def test_a_cancelled_tick_then_a_rerun_fires_each_cron_once(
    pool: asyncpg.Pool,
    config: config_module.Config,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
):
    alice = await make_user("alice")
    await add_crons(pool, alice, 200, datetime(2024, 3, 2, tzinfo=UTC))
    insert_plans = submit._insert_plans
    started = asyncio.Event()

    async def announce_then_insert(*args: Any) -> None:
        started.set()
        await insert_plans(*args)

    monkeypatch.setattr(submit, "_insert_plans", announce_then_insert)
    task = asyncio.create_task(loop.tick(pool, NOW, 200, config))
    # Cancelled while the stages and jobs are being inserted: numbers are taken, builds exist.
    await started.wait()
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.setattr(submit, "_insert_plans", insert_plans)
    assert await drain(pool, config, NOW, 64) == 200
    assert set((await builds_per_cron(pool)).values()) == {1}
    # The builds were numbered 1..200 once: a rolled-back batch used no numbers.
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT max(number) FROM builds") == 200


async def test_run_fires_a_cron_due_soon_without_waiting_for_the_interval(
    pool: asyncpg.Pool, config: config_module.Config, make_user: MakeUser
):
    alice = await make_user("alice")
    [cron_id] = await add_crons(pool, alice, 1, datetime.now(UTC) + timedelta(seconds=0.3))
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(config, stop))  # cron.interval: 60 s
    try:
        for _ in range(200):  # up to 10 s: the build is a database row, polled
            if (await builds_per_cron(pool))[cron_id]:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task
    assert await builds_per_cron(pool) == {cron_id: 1}


async def test_a_crons_builds_are_listed_under_it_and_kept_when_it_goes(
    api: TestClient, pool: asyncpg.Pool, config: config_module.Config, token: MakeToken
):
    resp = await api.post(
        "/api/cron",
        headers=bearer(await token("cron:write")),
        json={"name": "nightly", "manifest": MANIFEST},
    )
    cron = await resp.json()
    await add_crons(pool, (await users_of(pool))[0], 1, datetime(2024, 3, 2, tzinfo=UTC))
    async with pool.acquire() as conn:
        await conn.execute("UPDATE crons SET next_run = $1", datetime(2024, 3, 2, tzinfo=UTC))
    assert await loop.tick(pool, NOW, 10, config) == 2
    read = bearer(await token("cron:read build:read"))
    url = f"/api/cron/{cron['id']}/builds"
    resp = await api.get(url, headers=read)
    [build] = await resp.json()
    assert (build["number"], build["tags"], build["trigger"]["type"]) == (
        1,
        ["cron:nightly"],
        "schedule",
    )
    resp = await api.get(url + "?tag=cron:nightly", headers=read)
    assert len(await resp.json()) == 1
    resp = await api.get(url + "?tag=other", headers=read)
    assert await resp.json() == []
    resp = await api.delete(f"/api/cron/{cron['id']}", headers=bearer(await token("cron:delete")))
    assert resp.status == 204
    resp = await api.get("/api/builds", headers=bearer(await token("build:read")))
    assert len(await resp.json()) == 2


async def users_of(pool: asyncpg.Pool) -> list[User]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT id, username, email, created_at FROM users ORDER BY id")
    return [User(**row) for row in rows]
