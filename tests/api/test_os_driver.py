"""Who may submit `driver: os` builds (issue 11 row 1, docs/configuration.md §1.3 `os_driver`):
only users listed in `os_driver.users`, over the API and when their cron jobs fire."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid.api.app import create_app
from marid.config import Config, OsDriverConfig
from marid.scheduler import loop
from marid.users import User
from tests.conftest import MakeToken, MakeUser, bearer

OS = "driver: {type: os}\nstages: [s]\njobs:\n- stage: s\n  commands: [id]\n"
REFUSED = {"manifest": ["Manifest driver error: os - driver disabled"]}


def with_os(config: Config, users: list[str]) -> Config:
    return dataclasses.replace(config, drivers=["docker", "os"], os_driver=OsDriverConfig(users))


async def submit(client: TestClient, token: str) -> tuple[int, Any]:
    resp = await client.post("/api/builds", headers=bearer(token), json={"manifest": OS})
    return resp.status, await resp.json()


async def test_a_user_not_listed_for_the_os_driver_gets_the_field_error(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    config: Config,
    pool: asyncpg.Pool,
    token: MakeToken,
    make_user: MakeUser,
):
    client = await aiohttp_client(create_app(with_os(config, ["alice"]), pool))
    bob = await make_user("bob")
    assert await submit(client, await token("build:write", user=bob)) == (400, REFUSED)


async def test_a_user_listed_for_the_os_driver_may_submit_os_builds(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    config: Config,
    pool: asyncpg.Pool,
    token: MakeToken,
    alice: User,
):
    client = await aiohttp_client(create_app(with_os(config, ["alice"]), pool))
    status, body = await submit(client, await token("build:write"))
    assert (status, body["status"]) == (201, "queued")
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT driver FROM builds") == "os"


async def test_a_file_that_enables_os_without_listing_users_lets_nobody_use_it(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    config: Config,
    pool: asyncpg.Pool,
    token: MakeToken,
    alice: User,
):
    loaded = config_module.from_dict(
        {
            "server": {"url": config.server.url},
            "database": {"dsn": config.database.dsn},
            "crypto": {"key": config.crypto.key},
            "storage": {"backend": "fs", "path": config.storage.path},
            "drivers": ["docker", "os"],
        }
    )
    assert loaded.os_driver.users == []
    client = await aiohttp_client(create_app(loaded, pool))
    assert await submit(client, await token("build:write")) == (400, REFUSED)


async def test_a_cron_job_fires_an_os_build_only_for_a_listed_author(
    pool: asyncpg.Pool, config: Config, make_user: MakeUser
):
    alice, bob = await make_user("alice"), await make_user("bob")
    due = datetime(2024, 3, 2, tzinfo=UTC)
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """
            INSERT INTO crons (user_id, author_id, name, schedule, manifest, next_run)
            SELECT u, u, 'nightly', 'daily', $2, $3 FROM unnest($1::bigint[]) AS u
            RETURNING id, author_id
            """,
            [alice.id, bob.id],
            OS,
            due,
        )
    cron_of = {row["author_id"]: row["id"] for row in rows}
    now = datetime(2024, 3, 2, 0, 0, 5, tzinfo=UTC)
    assert await loop.tick(pool, now, 10, with_os(config, ["alice"])) == 2
    async with pool.acquire() as conn:
        built = await conn.fetch("SELECT cron_id, user_id, driver FROM builds")
        unbuilt = await conn.fetchval("SELECT cron_id FROM cron_runs WHERE build_id IS NULL")
    assert [tuple(row) for row in built] == [(cron_of[alice.id], alice.id, "os")]
    assert unbuilt == cron_of[bob.id]
