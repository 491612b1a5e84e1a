"""A cron job created or changed while the scheduler sleeps fires on time the first time: the
write NOTIFYs marid_crons on commit and the sleeping loop wakes (docs/architecture.md), also
after its LISTEN connection was lost. Real schedulers, real PostgreSQL; `cron.interval` is an
hour, so a build within the 30 s the tests wait was not made by the fallback poll."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import channels, crons
from marid import config as config_module
from marid import listen as listener_module
from marid.api import live
from marid.config import CronConfig
from marid.listen import Listener
from marid.manifest import ManifestLimits
from marid.pgcluster import Cluster
from marid.scheduler import loop
from marid.users import User
from marid.validation import Errors
from tests.conftest import MakeToken, bearer

MANIFEST = "driver: {type: docker, image: busybox, workspace: /w}\n"
NOON = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
LEAD = timedelta(seconds=6)  # how far before NOON the test clocks read when (re)set
WAIT = 30.0  # seconds the tests wait for what should take well under a second (or LEAD)
STEP = 0.05  # seconds between looks


class Clock:
    """Wall-clock time moved to read NOON - LEAD when made or `reset`: the API's and the
    schedulers' clock, so that a schedule of "0 12 * * *" is due LEAD from then. Tests reset it
    just before the request that schedules the run, so a slow set-up does not eat the lead."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.offset = NOON - LEAD - datetime.now(UTC)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def until(what: str, check: Callable[[], object]) -> None:
    """Poll `check` until it is true; fail naming `what` after WAIT seconds."""
    for _ in range(int(WAIT / STEP)):
        if check():
            return
        await asyncio.sleep(STEP)
    raise AssertionError(f"still waiting after {WAIT:g}s for {what}")


async def until_built(pool: asyncpg.Pool, cron_id: int) -> None:
    """Poll until the cron job has a build; fail after WAIT seconds."""
    for _ in range(int(WAIT / STEP)):
        if await pool.fetchval("SELECT EXISTS (SELECT 1 FROM builds WHERE cron_id = $1)", cron_id):
            return
        await asyncio.sleep(STEP)
    raise AssertionError(f"no build of cron job {cron_id} after {WAIT:g}s")


def asleep(alarm: loop.Alarm, connections: int = 1) -> bool:
    """Whether the loop is listening (its `connections`-th connection is up) and sleeping out
    the interval: any cron job written from now on can only fire by waking it."""
    until_ = alarm.sleeping_until
    far = alarm.clock() + timedelta(minutes=30)
    return alarm.connections >= connections and until_ is not None and until_ > far


@pytest.fixture
def hourly(config: config_module.Config) -> config_module.Config:
    """The test config with `cron.interval` an hour."""
    return dataclasses.replace(config, cron=CronConfig(interval=3600.0))


@dataclasses.dataclass
class Schedulers:
    alarms: list[loop.Alarm]
    tasks: list[asyncio.Task[None]]
    stop: asyncio.Event


@pytest.fixture
async def start(hourly: config_module.Config) -> AsyncIterator[Callable[..., Schedulers]]:
    """`start(clock, n)`: n running scheduler loops, stopped (and checked) at the end."""
    started: list[Schedulers] = []

    def run(clock: Callable[[], datetime] = lambda: datetime.now(UTC), n: int = 1) -> Schedulers:
        stop = asyncio.Event()
        alarms = [loop.Alarm(clock) for _ in range(n)]
        tasks = [asyncio.create_task(loop.run(hourly, stop, alarm=alarm)) for alarm in alarms]
        started.append(Schedulers(alarms, tasks, stop))
        return started[-1]

    yield run
    for schedulers in started:
        schedulers.stop.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*schedulers.tasks)


async def builds_of(pool: asyncpg.Pool, cron_id: int) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM builds WHERE cron_id = $1", cron_id))


async def test_a_cron_created_through_the_api_wakes_sleeping_schedulers_and_fires_once(
    api: TestClient,
    pool: asyncpg.Pool,
    token: MakeToken,
    start: Callable[..., Schedulers],
    monkeypatch: pytest.MonkeyPatch,
):
    write = bearer(await token("cron:write"))
    clock = Clock()
    monkeypatch.setattr(crons, "now", clock)
    schedulers = start(clock, n=2)
    await until("both schedulers to listen and sleep", lambda: all(map(asleep, schedulers.alarms)))
    body = {"name": "noon", "schedule": "0 12 * * *", "manifest": MANIFEST}
    clock.reset()  # the schedulers sleep an hour whatever the clock reads now
    resp = await api.post("/api/cron", headers=write, json=body)
    cron = await resp.json()
    assert (resp.status, cron["next_run"]) == (201, "2030-06-01T12:00:00Z"), "test setup too slow?"
    await until_built(pool, cron["id"])
    schedulers.stop.set()
    await asyncio.gather(*schedulers.tasks)
    assert await builds_of(pool, cron["id"]) == 1  # two schedulers woke, one fired


async def test_a_patch_that_moves_next_run_earlier_wakes_the_scheduler(
    api: TestClient,
    pool: asyncpg.Pool,
    token: MakeToken,
    start: Callable[..., Schedulers],
    monkeypatch: pytest.MonkeyPatch,
):
    write = bearer(await token("cron:write"))
    clock = Clock()
    monkeypatch.setattr(crons, "now", clock)
    body = {"name": "nightly", "schedule": "daily", "manifest": MANIFEST}
    cron = await (await api.post("/api/cron", headers=write, json=body)).json()
    assert cron["next_run"] == "2030-06-02T00:00:00Z"  # twelve hours on: past the interval
    [alarm] = start(clock).alarms
    await until("the scheduler to listen and sleep", lambda: asleep(alarm))
    url = f"/api/cron/{cron['id']}"
    clock.reset()
    resp = await api.patch(url, headers=write, json={"schedule": "0 12 * * *"})
    moved = await resp.json()
    assert (resp.status, moved["next_run"]) == (200, "2030-06-01T12:00:00Z"), "setup too slow?"
    await until_built(pool, cron["id"])
    assert await builds_of(pool, cron["id"]) == 1


async def test_a_rolled_back_cron_write_notifies_nobody(
    pool: asyncpg.Pool, config: config_module.Config, alice: User
):
    got: asyncio.Queue[str] = asyncio.Queue()
    listening = await asyncpg.connect(config.database.dsn)
    try:
        await listening.add_listener(channels.CRONS, lambda *args: got.put_nowait(args[3]))
        form = crons.CronForm("rolled back", "daily", MANIFEST, "UTC", Errors())
        limits = ManifestLimits.from_config(config)
        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            await crons.create(conn, alice, form, limits, NOON)
            await transaction.rollback()
            await conn.execute("SELECT pg_notify($1, 'after')", channels.CRONS)
        async with asyncio.timeout(WAIT):
            assert await got.get() == "after"  # notifications arrive in commit order
    finally:
        await listening.close()


async def test_a_listener_reconnects_with_backoff_and_logs_once_per_outage(
    pool: asyncpg.Pool,
    config: config_module.Config,
    pg_cluster: Cluster,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO, logger=listener_module.__name__)
    got: list[str] = []
    connections = []
    listener = Listener(
        config.database.dsn, "test_channel", got.append, lambda: connections.append(1), 0.01, 0.05
    )
    task = asyncio.create_task(listener.run())
    database = await pool.fetchval("SELECT current_database()")
    admin = await asyncpg.connect(pg_cluster.dsn())
    try:
        await until("the first connection", lambda: listener.pid is not None)
        first = listener.pid
        # A database that goes away and refuses connections for a while, as during a restart.
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend($1)", first)
        await until("three failed attempts", lambda: listener.failures >= 3)
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await until("the reconnection", lambda: listener.pid not in (None, first))
        await pool.execute("SELECT pg_notify('test_channel', 'back')")
        await until("the notification", lambda: got == ["back"])
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert len(connections) == 2
    logged = [r for r in caplog.records if r.name == listener_module.__name__]
    assert [r.levelname for r in logged] == ["WARNING", "INFO"], caplog.text


async def test_a_scheduler_listens_again_after_a_database_outage(
    api: TestClient,
    pool: asyncpg.Pool,
    token: MakeToken,
    pg_cluster: Cluster,
    start: Callable[..., Schedulers],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    write = bearer(await token("cron:write"))
    database = await pool.fetchval("SELECT current_database()")
    [alarm] = start().alarms
    await until("the scheduler to listen and sleep", lambda: asleep(alarm))
    admin = await asyncpg.connect(pg_cluster.dsn())
    try:  # every connection to the database dropped, new ones refused until it is "back"
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database
        )
        await until("the outage to be noticed", lambda: "LISTEN marid_crons" in caplog.text)
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    await until("the scheduler to listen again", lambda: asleep(alarm, connections=2))
    # Written after the outage and due already: only the NOTIFY can wake the scheduler.
    monkeypatch.setattr(crons, "now", lambda: datetime.now(UTC) - timedelta(hours=1))
    body = {"name": "hourly", "schedule": "30 * * * *", "manifest": MANIFEST}
    resp = await api.post("/api/cron", headers=write, json=body)
    cron = await resp.json()
    assert resp.status == 201, cron
    await until_built(pool, cron["id"])
    # asyncpg's pools log their own retries; of marid's, only the listener logged, once, and
    # the API serving this test, whose connections were dropped too (docs/api.md §1.4).
    ours = [r.name for r in caplog.records if r.name.startswith("marid") and r.levelname != "INFO"]
    assert sorted(ours) == [live.__name__, listener_module.__name__], caplog.text
