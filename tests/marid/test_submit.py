"""submit_many: a batch of builds in a fixed number of statements; submit is a batch
of one (docs/manifest.md §5, docs/api.md §7.4)."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg

from marid import builds, channels, manifest
from marid.submit import Submission, submit, submit_many
from marid.users import User
from tests.conftest import MakeUser

DOCKER = "driver: {type: docker, image: busybox, workspace: /w}\njobs: [{stage: s}]\nstages: [s]\n"
OS = "driver: {type: os}\n"


def submission(user: User, text: str = DOCKER, **fields: object) -> Submission:
    return Submission(user, user, None, manifest.parse(text), **fields)  # type: ignore[arg-type]


async def test_a_batch_numbers_each_owners_builds_in_order_and_returns_them_as_stored(
    pool: asyncpg.Pool, make_user: MakeUser
):
    alice, bob = await make_user("alice"), await make_user("bob")
    async with pool.acquire() as conn, conn.transaction():
        first = await submit(conn, submission(bob))
        made = await submit_many(
            conn,
            [
                submission(alice, tags=("b", "a:x", "b", "é", "z")),
                submission(bob, OS, system_tags=("cron:nightly",)),
                submission(alice, trigger_type="schedule", trigger_data={"username": "x"}),
            ],
        )
        stored = [await builds.get(conn, build.id) for build in [first, *made]]
    # `pending` is not stored: reading a build adds it from the runners alive then.
    assert [first, *made] == [dataclasses.replace(b, pending=None) for b in stored if b]
    assert [(b.user_id, b.number) for b in made] == [(alice.id, 1), (bob.id, 2), (alice.id, 2)]
    assert [b.tags for b in made] == [["b", "z", "é"], ["cron:nightly"], []]
    assert made[2].trigger_data == {"username": "x"}
    assert made[1].trigger_data == {"email": "bob@example.com", "username": "bob"}


async def test_an_empty_batch_makes_nothing(pool: asyncpg.Pool):
    async with pool.acquire() as conn:
        assert await submit_many(conn, []) == []
        assert await conn.fetchval("SELECT count(*) FROM build_counters") == 0


async def test_runners_are_woken_once_per_driver_when_the_batch_commits(
    pool: asyncpg.Pool, make_user: MakeUser
):
    alice = await make_user("alice")
    woken: list[str] = []

    def wake(conn: object, pid: int, channel: str, payload: str) -> None:
        woken.append(payload)

    async with pool.acquire() as listener:
        await listener.add_listener(channels.BUILDS, wake)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await submit_many(conn, [submission(alice, text) for text in (DOCKER, OS, DOCKER)])
                await asyncio.sleep(0.1)
                assert woken == []  # nothing before the commit
            for _ in range(50):
                if len(woken) == 2:
                    break
                await asyncio.sleep(0.02)
        finally:
            await listener.remove_listener(channels.BUILDS, wake)
    assert sorted(woken) == ["docker", "os"]
