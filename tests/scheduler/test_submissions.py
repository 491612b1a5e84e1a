"""A cron job's build is the build POST /builds makes of the same manifest (docs/manifest.md §5),
apart from its trigger and its `cron:` tag (docs/api.md §11.2)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid.scheduler import loop
from marid.users import User
from tests.api.helpers import add_collaborator, create_namespace
from tests.conftest import MakeToken, MakeUser, bearer

NOW = datetime(2024, 3, 2, 0, 0, 5, tzinfo=UTC)
BODY = """\
driver: {type: docker, image: busybox, workspace: /w}
env: [SHARED=from env, ONLY_ENV=1, SHARED=from env again]
objects: [config.yml => /etc/app.yml, missing.bin, personal.txt]
sources: [https://example.com/repo.git main => src, https://example.com/other.git]
stages: [build, test, build]
allow_failures: [test]
jobs:
- {stage: build, commands: [make, make check], artifacts: [out/app => app, out/build.log]}
- {stage: test, name: Unit Tests, commands: [./test], artifacts: [out/app2 => app, report.xml]}
- {stage: build, commands: ['true'], timeout: 5m}
- {stage: nowhere, commands: [ignored]}
"""


async def add_resources(pool: asyncpg.Pool, alice: User, bob: User, ns_id: int) -> None:
    """Personal and namespace variables, keys and objects that compete on names (§5.5)."""
    async with pool.acquire() as conn:
        await conn.executemany(
            """
            INSERT INTO variables (user_id, author_id, namespace_id, detached, key, masked, value,
                                   value_sealed)
            VALUES ($1, $1, $2, $3, $4, $5, $6, $7)
            """,
            [
                (alice.id, None, False, "SHARED", False, "personal", None),
                (alice.id, None, False, "PERSONAL", False, "p", None),
                (alice.id, None, False, "SECRET", True, None, b"sealed personal"),
                (alice.id, None, False, "OLD", False, "attached", None),
                (alice.id, None, True, "OLD", False, "detached", None),
                (alice.id, ns_id, False, "SHARED", False, "namespace", None),
                (alice.id, ns_id, False, "SECRET", True, None, b"sealed namespace"),
                (alice.id, ns_id, False, "NS_ONLY", False, "n", None),
                (bob.id, None, False, "BOBS", False, "never", None),
            ],
        )
        await conn.executemany(
            """
            INSERT INTO ssh_keys (user_id, author_id, namespace_id, name, key_sealed, config)
            VALUES ($1, $1, $2, $3, $4, $5)
            """,
            [
                (alice.id, None, "deploy", b"personal deploy", "Host *"),
                (alice.id, None, "own", b"own", ""),
                (alice.id, ns_id, "deploy", b"namespace deploy", ""),
                (alice.id, ns_id, "a-first", b"first", ""),
                (bob.id, None, "bobs", b"never", ""),
            ],
        )
        await conn.executemany(
            """
            INSERT INTO objects (user_id, author_id, namespace_id, name, type, size, md5, sha256,
                                 blob_key)
            VALUES ($1, $1, $2, $3, 'text/plain', 1, 'm', 's',
                    $3 || '-' || coalesce($2::bigint, 0))
            """,
            [
                (alice.id, None, "config.yml"),
                (alice.id, ns_id, "config.yml"),
                (alice.id, None, "personal.txt"),
                (bob.id, None, "personal.txt"),
            ],
        )


async def rows_of(conn: asyncpg.Connection, build_id: int) -> dict[str, Any]:
    """Everything submission wrote for the build, ids and times left out, its own number
    replaced by N (the two builds have different numbers)."""
    number = await conn.fetchval("SELECT number FROM builds WHERE id = $1", build_id)
    queries = {
        "build": """
            SELECT user_id, author_id, namespace_id, manifest, driver, status, output, pinned,
                   timeout_seconds, resources::text, started_at, finished_at
            FROM builds WHERE id = $1
            """,
        "stages": """
            SELECT name, allow_failures, position FROM build_stages WHERE build_id = $1
            ORDER BY id
            """,
        "jobs": """
            SELECT s.name AS stage, j.name, j.commands, j.position, j.timeout_seconds,
                   j.artifacts::text, j.status, j.output
            FROM build_jobs j JOIN build_stages s ON s.id = j.stage_id
            WHERE j.build_id = $1 ORDER BY j.id
            """,
        "artifacts": """
            SELECT j.name AS job, a.user_id, a.source, a.name, a.blob_key, a.size, a.md5,
                   a.sha256, a.deleted_at
            FROM build_artifacts a JOIN build_jobs j ON j.id = a.job_id
            WHERE a.build_id = $1 ORDER BY a.id
            """,
        "variables": """
            SELECT variable_id, key, value, value_sealed, masked, position FROM build_variables
            WHERE build_id = $1 ORDER BY id
            """,
        "keys": """
            SELECT key_id, name, key_sealed, config, location FROM build_keys
            WHERE build_id = $1 ORDER BY id
            """,
        "objects": """
            SELECT object_id, source, name, placed FROM build_objects WHERE build_id = $1
            ORDER BY id
            """,
    }
    found = {}
    for name, sql in queries.items():
        found[name] = [
            {
                k: v.replace(f"#{number}", "#N") if k in ("name", "stage") else v
                for k, v in r.items()
            }
            for r in await conn.fetch(sql, build_id)
        ]
    return found


PERSONAL_ONLY = (
    ["OLD=attached", "PERSONAL=p", "SECRET=sealed personal", "ONLY_ENV=1", "SHARED=from env again"],
    ["deploy=personal deploy", "own=own"],
    [True, False, True],
)


NAMESPACE_ONLY = (
    ["NS_ONLY=n", "SECRET=sealed namespace", "ONLY_ENV=1", "SHARED=from env again"],
    ["a-first=first", "deploy=namespace deploy"],
    [True, False, False],
)


@pytest.mark.parametrize(
    ("author", "namespace", "expected"),
    [
        # Personal resources only without a namespace, whoever submits (docs/manifest.md §5.5).
        ("alice", "team@alice", NAMESPACE_ONLY),
        ("bob", "team@alice", NAMESPACE_ONLY),
        ("alice", None, PERSONAL_ONLY),
        # Created by the scheduler, found by the API: empty, so only the manifest's env.
        ("alice", "team/new", (["ONLY_ENV=1", "SHARED=from env again"], [], [False] * 3)),
    ],
    ids=["owner-in-namespace", "collaborator-in-namespace", "personal", "new-namespace"],
)
async def test_a_cron_build_has_the_rows_of_the_same_manifest_submitted_through_the_api(
    api: TestClient,
    pool: asyncpg.Pool,
    config: config_module.Config,
    alice: User,
    make_user: MakeUser,
    token: MakeToken,
    author: str,
    namespace: str | None,
    expected: tuple[list[str], list[str], list[bool]],
):
    bob = await make_user("bob")
    scope = "namespace:read,write invite:read,write"
    mine, bobs = await token(scope), await token(scope, user=bob)
    team = await create_namespace(api, mine, "team")
    await add_collaborator(api, mine, "team", "alice", bobs, "bob")
    await add_resources(pool, alice, bob, team["id"])
    submitter = alice if author == "alice" else bob
    text = BODY + (f"namespace: {namespace}\n" if namespace else "")
    async with pool.acquire() as conn:
        cron_id = await conn.fetchval(
            """
            INSERT INTO crons (user_id, author_id, name, schedule, manifest, next_run)
            VALUES ($1, $2, 'nightly', 'daily', $3, $4) RETURNING id
            """,
            alice.id,
            submitter.id,
            text,
            datetime(2024, 3, 2, tzinfo=UTC),
        )
    assert await loop.tick(pool, NOW, 10, config) == 1
    resp = await api.post(
        "/api/builds",
        headers=bearer(await token("build:write", user=submitter)),
        json={"manifest": text},
    )
    assert resp.status == 201, await resp.text()
    submitted = await resp.json()
    async with pool.acquire() as conn:
        fired = await conn.fetchval("SELECT id FROM builds WHERE cron_id = $1", cron_id)
        assert fired is not None and fired != submitted["id"]
        cron_rows, api_rows = await rows_of(conn, fired), await rows_of(conn, submitted["id"])
        numbers = await conn.fetch("SELECT number FROM builds ORDER BY id")
    assert cron_rows == api_rows
    assert [row["number"] for row in numbers] == [1, 2]  # both are alice's builds
    # Not vacuous: the snapshot follows §5.5, personal resources only for the owner.
    variables, keys, objects = expected
    assert [
        f"{v['key']}={v['value'] or v['value_sealed'].decode()}" for v in cron_rows["variables"]
    ] == variables
    assert [f"{k['name']}={k['key_sealed'].decode()}" for k in cron_rows["keys"]] == keys
    assert [o["object_id"] is not None for o in cron_rows["objects"]] == objects
    assert [j["name"] for j in cron_rows["jobs"]] == [
        "create-driver",
        "clone.0",
        "clone.1",
        "build.1",
        "build.2",
        "unit-tests",
    ]
    assert [(a["job"], a["name"]) for a in cron_rows["artifacts"]] == [
        ("build.1", "app"),
        ("build.1", "build.log"),
        ("unit-tests", "report.xml"),
    ]
