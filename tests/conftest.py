"""Test harness: a throwaway PostgreSQL cluster per session, a template database built from
migrations/ once, and a fresh copy of it for every test. Nothing of marid's is mocked."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid import db, scopes, tokens, users
from marid.api.app import create_app
from marid.blobs import BlobStore, open_store
from marid.pgcluster import Cluster
from tests.fixtures.clusters import copy_database, migrated_template, throwaway_cluster

# Fixture modules contributed by other parts of the suite (e.g. the S3 server).
pytest_plugins: list[str] = ["tests.fixtures.s3", "tests.fixtures.outage"]

TEMPLATE = "marid_test_template"
API_URL = "https://ci.example.com/api"
_numbers = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    with throwaway_cluster("marid-test-pg-") as cluster:
        yield cluster


@pytest.fixture(scope="session")
async def template_db(pg_cluster: Cluster) -> str:
    """The name of a database holding every migration, copied for each test."""
    return await migrated_template(pg_cluster, TEMPLATE)


@pytest.fixture
async def db_dsn(pg_cluster: Cluster, template_db: str) -> AsyncIterator[str]:
    """The DSN of a fresh, migrated database of this test's own."""
    name = f"marid_test_{os.getpid()}_{next(_numbers)}"
    admin = await asyncpg.connect(pg_cluster.dsn())
    try:
        await copy_database(admin, name, template_db)
        yield pg_cluster.dsn(name)
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
def config(db_dsn: str, tmp_path: Path) -> config_module.Config:
    return base_config(db_dsn, tmp_path)


def base_config(dsn: str, tmp_path: Path) -> config_module.Config:
    """The configuration every test starts from: the database `dsn`, blobs under `tmp_path`."""
    return config_module.from_dict(
        {
            "server": {"url": "https://ci.example.com"},
            "database": {"dsn": dsn},
            "crypto": {"key": "test-crypto-key-" + "0" * 32},
            "storage": {"backend": "fs", "path": str(tmp_path / "blobs")},
            # Tests never reach a registry: a missing image must not send the engine to Docker
            # Hub. Pull tests set another policy with a registry on loopback.
            "docker": {"pull": "never"},
            # Tests make requests faster than any client should; tests/api/test_ratelimit.py
            # turns it on.
            "rate_limit": {"enabled": False},
            # Builds that fail keep no workspace, so that tests of cleanup find none left;
            # the resume tests (tests/runner/test_restart.py) keep them.
            "builds": {"keep_workspace": 0},
        }
    )


@pytest.fixture
async def pool(config: config_module.Config) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(config.database.dsn, size=5)
    yield pool
    await pool.close()


@pytest.fixture
async def blobs(config: config_module.Config) -> AsyncIterator[BlobStore]:
    """The blob store of the test's configuration (a directory under tmp_path)."""
    store = open_store(config.storage)
    yield store
    await store.close()


@pytest.fixture
async def api(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    config: config_module.Config,
    pool: asyncpg.Pool,
) -> TestClient:
    """An HTTP client for the whole application (API under /api)."""
    return await aiohttp_client(create_app(config, pool))


@pytest.fixture
def debug_config(config: config_module.Config) -> config_module.Config:
    return dataclasses.replace(config, server=dataclasses.replace(config.server, debug=True))


MakeUser = Callable[..., Awaitable[users.User]]
MakeToken = Callable[..., Awaitable[str]]


@pytest.fixture
def make_user(pool: asyncpg.Pool) -> MakeUser:
    async def make(username: str = "alice", password: str = "password1") -> users.User:
        async with pool.acquire() as conn:
            return await users.create(conn, username, f"{username}@example.com", password)

    return make


@pytest.fixture
async def alice(make_user: MakeUser) -> users.User:
    return await make_user("alice")


@pytest.fixture
def token(pool: asyncpg.Pool, alice: users.User) -> MakeToken:
    """`await token("build:read")` -> a token value for alice (or `user=`) with that scope."""
    names = itertools.count()

    async def make(scope: str = "", user: users.User | None = None) -> str:
        async with pool.acquire() as conn:
            _, value = await tokens.create(
                conn, user or alice, f"test-{next(names)}", scopes.parse(scope)
            )
        return value

    return make


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}
