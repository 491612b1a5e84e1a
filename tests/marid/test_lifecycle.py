"""The build lifecycle on real PostgreSQL: the fence against a concurrent recovery, the stored
driver settings, kills and recovery (docs/architecture.md §3.1, §3.2)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from marid import builds, lifecycle, manifest
from marid.blobs import Blob
from marid.lifecycle import Claim, LostLease
from marid.submit import Submission, submit
from marid.users import User

DOCKER = """\
driver: {type: docker, image: marid-test/busybox, workspace: /work}
objects: [data.txt => conf/data.txt]
stages: [s]
jobs:
- stage: s
  commands: [echo hi > app.txt]
  artifacts: [app.txt]
"""
A_BLOB = Blob(key="0" * 32, size=3, md5="1" * 32, sha256="2" * 64)

Write = Callable[[asyncpg.Connection, Claim, int], Awaitable[Any]]
# Every fenced write a runner makes, on the build's job `s.1` where it names a job.
WRITES: dict[str, Write] = {
    "renew": lambda conn, claim, job: lifecycle.renew(conn, claim, 30.0),
    "job_started": lambda conn, claim, job: lifecycle.job_started(conn, claim, job),
    "append_output": lambda conn, claim, job: lifecycle.append_output(
        conn, claim, job, 0, "late\n"
    ),
    "job_finished": lambda conn, claim, job: lifecycle.job_finished(
        conn, claim, job, "passed", True
    ),
    "object_placed": lambda conn, claim, job: _place_object(conn, claim),
    "artifact_recorded": lambda conn, claim, job: lifecycle.artifact_recorded(
        conn, claim, job, "app.txt", "app.txt", A_BLOB
    ),
    "build_finished": lambda conn, claim, job: lifecycle.build_finished(conn, claim, "passed"),
}


async def _place_object(conn: asyncpg.Connection, claim: Claim) -> None:
    object_id = await conn.fetchval(
        "SELECT id FROM build_objects WHERE build_id = $1", claim.build_id
    )
    await lifecycle.object_placed(conn, claim, object_id)


async def _submit(pool: asyncpg.Pool, owner: User, text: str = DOCKER) -> int:
    async with pool.acquire() as conn, conn.transaction():
        build = await submit(conn, Submission(owner, owner, None, manifest.parse(text)))
    return build.id


async def _claim(pool: asyncpg.Pool, drivers: tuple[str, ...] = ("docker",)) -> Claim:
    async with pool.acquire() as conn:
        claim = await lifecycle.claim(conn, "runner-1", list(drivers), 30.0)
    assert claim is not None
    return claim


async def _expire(pool: asyncpg.Pool, build_id: int) -> None:
    """The runner stopped renewing long ago."""
    await pool.execute(
        "UPDATE builds SET lease_expires_at = now() - interval '1 hour' WHERE id = $1", build_id
    )


async def _job(pool: asyncpg.Pool, build_id: int, name: str = "s.1") -> int:
    job_id: int = await pool.fetchval(
        "SELECT id FROM build_jobs WHERE build_id = $1 AND name = $2", build_id, name
    )
    return job_id


async def _state(conn: asyncpg.Connection, build_id: int) -> dict[str, Any]:
    """Every row a runner's write could change."""

    async def rows(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await conn.fetch(sql, build_id)]

    # The build's output is its jobs' outputs, composed when read (stored once, issue 10).
    build = await builds.get(conn, build_id)
    output = builds.output_text(build, "") if build else None
    return {
        "build": [
            (*row[:3], output, *row[3:])
            for row in await rows(
                "SELECT status, attempt, runner, started_at, finished_at, lease_expires_at"
                " FROM builds WHERE id = $1"
            )
        ],
        "jobs": await rows(
            "SELECT name, status, output, started_at, finished_at FROM build_jobs"
            " WHERE build_id = $1 ORDER BY id"
        ),
        "chunks": await rows(
            "SELECT o.job_id, o.attempt, o.text FROM build_job_output o"
            " JOIN build_jobs j ON j.id = o.job_id WHERE j.build_id = $1"
        ),
        "objects": await rows("SELECT placed FROM build_objects WHERE build_id = $1"),
        "artifacts": await rows("SELECT blob_key FROM build_artifacts WHERE build_id = $1"),
    }


async def _waiting_for_a_lock(pool: asyncpg.Pool, pid: int) -> None:
    """Until the backend `pid` waits for a lock."""
    for _ in range(1000):
        waiting = await pool.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited for a lock")


@pytest.mark.parametrize("write", WRITES)
async def test_a_late_write_waits_for_a_concurrent_recovery_then_changes_nothing(
    pool: asyncpg.Pool, alice: User, write: str
):
    build_id = await _submit(pool, alice)
    claim = await _claim(pool)
    job_id = await _job(pool, build_id)
    await _expire(pool, build_id)
    async with pool.acquire() as recovery, pool.acquire() as late:
        async with recovery.transaction():
            recovered = await lifecycle.recover_expired(recovery, 3)
            assert recovered.build_ids == [build_id]
            left = await _state(recovery, build_id)

            async def late_write() -> None:
                async with late.transaction():
                    await WRITES[write](late, claim, job_id)

            writing = asyncio.create_task(late_write())
            await _waiting_for_a_lock(pool, late.get_server_pid())
        with pytest.raises(LostLease):
            await writing
    async with pool.acquire() as conn:
        assert await _state(conn, build_id) == left
    assert left["build"][0][:3] == ("queued", 1, None)


async def test_recovery_skips_a_build_while_a_fenced_write_is_open(pool: asyncpg.Pool, alice: User):
    build_id = await _submit(pool, alice)
    claim = await _claim(pool)
    job_id = await _job(pool, build_id)
    await _expire(pool, build_id)
    async with pool.acquire() as runner, pool.acquire() as recovery:
        async with runner.transaction():
            await lifecycle.job_started(runner, claim, job_id)
            async with recovery.transaction():
                assert (await lifecycle.recover_expired(recovery, 3)).build_ids == []
        async with recovery.transaction():
            assert (await lifecycle.recover_expired(recovery, 3)).build_ids == [build_id]
        status = await runner.fetchval("SELECT status FROM build_jobs WHERE id = $1", job_id)
    assert status == "queued"  # the write committed first, then the recovery reset it


async def test_a_write_after_a_recovery_raises_lost_lease(pool: asyncpg.Pool, alice: User):
    build_id = await _submit(pool, alice)
    claim = await _claim(pool)
    await _expire(pool, build_id)
    async with pool.acquire() as conn:
        async with conn.transaction():
            await lifecycle.recover_expired(conn, 3)
        with pytest.raises(LostLease):
            async with conn.transaction():
                await lifecycle.job_started(conn, claim, await _job(pool, build_id))
        second = await _claim(pool)
        assert second == Claim(build_id, 2)
        with pytest.raises(LostLease):  # the first attempt stays out
            async with conn.transaction():
                await lifecycle.build_finished(conn, claim, "failed")
        assert await conn.fetchval("SELECT status FROM builds") == "running"


async def test_a_fenced_write_outside_a_transaction_is_refused(pool: asyncpg.Pool, alice: User):
    build_id = await _submit(pool, alice)
    claim = await _claim(pool)
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError):
            await lifecycle.job_started(conn, claim, await _job(pool, build_id))


async def test_load_returns_the_plan_and_driver_settings_stored_at_submission(
    pool: asyncpg.Pool, alice: User
):
    build_id = await _submit(pool, alice)
    # Whatever the manifest says now, the build runs as it was compiled at submission.
    await pool.execute("UPDATE builds SET manifest = 'driver: [not, yaml' WHERE id = $1", build_id)
    claim = await _claim(pool)
    async with pool.acquire() as conn:
        build = await lifecycle.load(conn, claim)
    assert (build.claim, build.owner_id, build.namespace_id) == (claim, alice.id, None)
    assert (build.driver, build.driver_config) == (
        "docker",
        {"type": "docker", "image": "marid-test/busybox", "workspace": "/work"},
    )
    assert [
        (s.name, [(j.name, j.commands, j.artifacts) for j in s.jobs]) for s in build.stages
    ] == [
        ("setup - #1", [("create-driver", "", [])]),
        ("s", [("s.1", "echo hi > app.txt", [("app.txt", "app.txt")])]),
    ]
    assert [(o.source, o.destination, o.blob_key) for o in build.objects] == [
        ("data.txt", "conf/data.txt", None)
    ]
    assert (build.variables, build.keys) == ([], [])
    assert build.timeout == manifest.parse(DOCKER).timeout
    assert build.resources == manifest.parse(DOCKER).resources


async def test_load_parses_the_manifest_of_a_build_stored_without_driver_settings(
    pool: asyncpg.Pool, alice: User
):
    build_id = await _submit(pool, alice)
    await pool.execute("UPDATE builds SET driver_config = NULL WHERE id = $1", build_id)  # 0010
    async with pool.acquire() as conn:
        build = await lifecycle.load(conn, await _claim(pool))
    assert build.driver_config == {
        "type": "docker",
        "image": "marid-test/busybox",
        "workspace": "/work",
    }


async def test_killing_a_queued_build_ends_it_and_its_jobs_without_output(
    pool: asyncpg.Pool, alice: User
):
    build_id = await _submit(pool, alice)
    async with pool.acquire() as conn, conn.transaction():
        assert await lifecycle.kill(conn, build_id) is True
    async with pool.acquire() as conn:
        state = await _state(conn, build_id)
        assert await lifecycle.claim(conn, "runner-1", ["docker"], 30.0) is None
    [(status, _, _, output, started_at, finished_at, _)] = state["build"]
    assert (status, output, started_at) == ("killed", None, None) and finished_at is not None
    assert [(name, status) for name, status, *_ in state["jobs"]] == [
        ("create-driver", "killed"),
        ("s.1", "killed"),
    ]


async def test_a_kill_requested_of_a_vanished_runner_ends_killed_at_recovery(
    pool: asyncpg.Pool, alice: User
):
    build_id = await _submit(pool, alice)
    claim = await _claim(pool)
    setup = await _job(pool, build_id, "create-driver")
    async with pool.acquire() as conn:
        async with conn.transaction():
            await lifecycle.job_started(conn, claim, setup)
            await lifecycle.append_output(conn, claim, setup, 0, "made\n")
            await lifecycle.job_finished(conn, claim, setup, "passed", True)
        async with conn.transaction():
            await lifecycle.job_started(conn, claim, await _job(pool, build_id))
            assert await lifecycle.kill(conn, build_id) is False  # running: only flagged
            assert await lifecycle.renew(conn, claim, 30.0) is True  # the runner would stop
    await _expire(pool, build_id)  # ... but it vanished
    async with pool.acquire() as conn:
        async with conn.transaction():
            recovered = await lifecycle.recover_expired(conn, 3)
        assert (recovered.build_ids, recovered.killed) == ([], [build_id])
        state = await _state(conn, build_id)
    assert [row[:4] for row in state["build"]] == [("killed", 1, "runner-1", "made\n")]
    assert [row[:3] for row in state["jobs"]] == [
        ("create-driver", "passed", "made\n"),
        ("s.1", "killed", None),
    ]


async def test_a_lease_lost_on_the_last_attempt_ends_the_build_failed_with_the_reason(
    pool: asyncpg.Pool, alice: User
):
    build_id = await _submit(pool, alice)
    for _ in range(2):  # attempts 1 and 2 lose their leases: requeued at once, each time
        await _claim(pool)
        await _expire(pool, build_id)
        async with pool.acquire() as conn, conn.transaction():
            assert (await lifecycle.recover_expired(conn, 3)).build_ids == [build_id]
    claim = await _claim(pool)
    assert claim.attempt == 3
    setup = await _job(pool, build_id, "create-driver")
    async with pool.acquire() as conn, conn.transaction():
        await lifecycle.job_started(conn, claim, setup)
        await lifecycle.append_output(conn, claim, setup, 0, "half a line")
    await _expire(pool, build_id)
    async with pool.acquire() as conn:
        async with conn.transaction():
            recovered = await lifecycle.recover_expired(conn, 3)
        assert (recovered.build_ids, recovered.killed, recovered.failed) == ([], [], [build_id])
        state = await _state(conn, build_id)
    reason = "marid: attempt 3 of 3 failed: runner lost its lease; giving up\n"
    assert [row[:4] for row in state["build"]] == [
        ("failed", 3, "runner-1", "half a line\n" + reason)
    ]
    assert [row[:3] for row in state["jobs"]] == [
        ("create-driver", "failed", "half a line\n" + reason),
        ("s.1", "failed", None),
    ]


async def test_a_failed_attempt_is_retried_after_its_delay_with_its_reason(
    pool: asyncpg.Pool, alice: User
):
    build_id = await _submit(pool, alice)
    claim = await _claim(pool)
    async with pool.acquire() as conn:
        async with conn.transaction():
            over = await lifecycle.attempt_failed(conn, claim, "engine away", 3, 3600.0)
        assert over.retried
        assert await lifecycle.claim(conn, "runner-1", ["docker"], 30.0) is None  # not yet
        assert 3500 < (await lifecycle.next_retry(conn, ["docker"]) or 0) <= 3600
        await conn.execute("UPDATE builds SET retry_at = now() WHERE id = $1", build_id)
        second = await lifecycle.claim(conn, "runner-1", ["docker"], 30.0)
        assert second == Claim(build_id, 2)
        assert (await lifecycle.load(conn, second)).previous == "attempt 1: engine away"
        assert await lifecycle.next_retry(conn, ["docker"]) is None
        with pytest.raises(LostLease):  # the failed attempt stays out
            async with conn.transaction():
                await lifecycle.attempt_failed(conn, claim, "again", 3, 0.0)


async def test_a_failed_attempt_of_a_build_asked_to_die_ends_it_killed(
    pool: asyncpg.Pool, alice: User
):
    build_id = await _submit(pool, alice)
    claim = await _claim(pool)
    async with pool.acquire() as conn:
        async with conn.transaction():
            assert await lifecycle.kill(conn, build_id) is False
        async with conn.transaction():
            over = await lifecycle.attempt_failed(conn, claim, "engine away", 3, 0.0)
        assert not over.retried
        assert await conn.fetchval("SELECT status FROM builds WHERE id = $1", build_id) == "killed"


async def test_writes_repeated_after_a_lost_acknowledgement_change_nothing(
    pool: asyncpg.Pool, alice: User
):
    """The runner writes again when a commit's answer was lost (runner/reporter.py `_write`):
    the chunk already stored and the job already ended stay as they are."""
    build_id = await _submit(pool, alice)
    claim = await _claim(pool)
    setup = await _job(pool, build_id, "create-driver")
    async with pool.acquire() as conn:
        async with conn.transaction():
            await lifecycle.job_started(conn, claim, setup)
        for _ in range(2):
            async with conn.transaction():
                await lifecycle.append_output(conn, claim, setup, 0, "made\n")
        for _ in range(2):
            async with conn.transaction():
                await lifecycle.job_finished(conn, claim, setup, "passed", True)
        state = await _state(conn, build_id)
    assert [row[:3] for row in state["jobs"]] == [
        ("create-driver", "passed", "made\n"),
        ("s.1", "queued", None),
    ]
