"""`marid migrate`: every file applies, reruns are no-ops, concurrent runs are serialised."""

import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from marid import db
from marid.pgcluster import Cluster


@pytest.fixture
async def empty_db(pg_cluster: Cluster) -> str:
    admin = await asyncpg.connect(pg_cluster.dsn())
    await admin.execute("DROP DATABASE IF EXISTS migrate_test WITH (FORCE)")
    await admin.execute("CREATE DATABASE migrate_test")
    await admin.close()
    return pg_cluster.dsn("migrate_test")


RESERVED = {20}


def test_migration_files_are_numbered_and_explained():
    files = db.migration_files()
    assert files, "no migrations found"
    numbers = [int(path.name[:4]) for path in files]
    assert numbers == sorted(set(numbers))  # no number twice
    # Issue 14 is built on parallel branches: 0020 belongs to another one, merged separately.
    assert set(range(1, numbers[-1] + 1)) - set(numbers) <= RESERVED
    for path in files:
        assert path.read_text().startswith("-- "), f"{path.name} must open with a -- why comment"


async def test_migrate_twice_is_a_no_op(empty_db: str):
    conn = await asyncpg.connect(empty_db)
    try:
        first = await db.migrate(conn)
        assert first == [p.name for p in db.migration_files()]
        assert await db.migrate(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(first)
    finally:
        await conn.close()


def run_migrate(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "marid", "--config", str(config), "migrate"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_concurrent_migrate_runs_apply_each_file_once(empty_db: str, tmp_path: Path):
    config = tmp_path / "marid.yml"
    config.write_text(
        f"server: {{url: http://x}}\ndatabase: {{dsn: '{empty_db}'}}\ncrypto: {{key: {'k' * 32}}}\n"
    )
    runs = [run_migrate(config) for _ in range(3)]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    names = [p.name for p in db.migration_files()]
    applied = [out for out, _ in outputs if out.startswith("applied")]
    assert [out.splitlines() for out in applied] == [[f"applied {n}" for n in names]]
    assert sum(out == "database is up to date\n" for out, _ in outputs) == 2
    conn = await asyncpg.connect(empty_db)
    try:
        rows = await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")
        assert [r["name"] for r in rows] == names
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_half_applied(empty_db: str, tmp_path: Path):
    (tmp_path / "0001_ok.sql").write_text("-- ok\nCREATE TABLE a (id int);")
    (tmp_path / "0002_broken.sql").write_text(
        "-- broken\nCREATE TABLE b (id int);\nSELECT nonsense;"
    )
    conn = await asyncpg.connect(empty_db)
    try:
        with pytest.raises(asyncpg.UndefinedColumnError):
            await db.migrate(conn, tmp_path)
        assert await conn.fetchval("SELECT to_regclass('a') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('b') IS NULL")
        assert await conn.fetchval("SELECT array_agg(name) FROM schema_migrations") == [
            "0001_ok.sql"
        ]
    finally:
        await conn.close()
