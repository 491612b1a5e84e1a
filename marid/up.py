"""`marid up`: the whole platform in one process, with no set-up.

Without `database.dsn` it runs a private PostgreSQL cluster in the data directory (kept
between starts), generates a crypto key there once, migrates, creates the `admin` user on
the first start and prints the API URL and a token.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import secrets
import sys
from pathlib import Path

import asyncpg
import yaml

from marid import cli, config, db, logs, scopes, tokens, users
from marid.pgcluster import Cluster, ClusterError, free_port, new_password

log = logging.getLogger(__name__)
FILLED = ("server.url", "database.dsn", "crypto.key")


def run(args: argparse.Namespace) -> None:
    data_dir: Path = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    cfg = cli.load_config(args, optional=FILLED)
    logs.configure(cfg.logging.level)
    cluster = None
    try:
        if not cfg.database.dsn:
            cluster = _embedded_cluster(data_dir / "postgres")
        cfg = _fill(cfg, args, data_dir, cluster)
        _write_effective_config(cfg, data_dir / "marid.yml")
        cli.run_async(cli.until_signal(lambda stop: _serve(cfg, stop, data_dir)))
    except ClusterError as exc:
        raise cli.Failure(cli.EXIT_DATABASE, f"marid: PostgreSQL: {exc}") from None
    finally:
        if cluster is not None:
            print("stopping PostgreSQL", file=sys.stderr)
            cluster.stop()


def _embedded_cluster(directory: Path) -> Cluster:
    """Start (initialising on first use) the cluster kept in `directory`."""
    state = directory / "cluster.json"
    if state.exists():
        saved = json.loads(state.read_text())
        cluster = Cluster(directory, saved["port"], saved["password"])
    else:
        cluster = Cluster(directory, free_port(), new_password())
    if not cluster.initialised():
        print(f"initialising PostgreSQL in {directory}", file=sys.stderr)
        cluster.init()
        state.write_text(json.dumps({"port": cluster.port, "password": cluster.password}))
        state.chmod(0o600)
    cluster.stop()  # a previous `marid up` killed hard may have left it running
    cluster.start()
    return cluster


def _fill(
    cfg: config.Config, args: argparse.Namespace, data_dir: Path, cluster: Cluster | None
) -> config.Config:
    server = cfg.server
    if not server.url:
        url = f"http://{args.host}:{args.port}"
        server = dataclasses.replace(server, url=url, api_url=url + "/api")
    server = dataclasses.replace(server, listen=f"{args.host}:{args.port}")
    database = cfg.database
    if cluster is not None:
        database = dataclasses.replace(database, dsn=cluster.dsn())
    crypto = cfg.crypto
    if not crypto.key:
        crypto = dataclasses.replace(crypto, key=_crypto_key(data_dir / "crypto.key"))
    storage = cfg.storage
    if storage.backend == "fs" and storage.path == config.StorageConfig.path:
        storage = dataclasses.replace(storage, path=str(data_dir / "blobs"))  # keep it all together
    return dataclasses.replace(
        cfg, server=server, database=database, crypto=crypto, storage=storage
    )


def _crypto_key(path: Path) -> str:
    """The key kept in `path`, generated on first use; losing it loses encrypted secrets."""
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()


def _write_effective_config(cfg: config.Config, path: Path) -> None:
    """Save the configuration in use so `marid --config <it> token create …` works alongside."""
    path.touch(mode=0o600)
    text = yaml.safe_dump(
        {
            "server": {"url": cfg.server.url, "api_url": cfg.server.api_url},
            "database": {"dsn": cfg.database.dsn},
            "crypto": {"key": cfg.crypto.key},
            "storage": dataclasses.asdict(cfg.storage),
        },
        sort_keys=False,
    )
    path.write_text(
        "# Written by `marid up` on each start: the configuration it runs with.\n" + text
    )


async def _serve(cfg: config.Config, stop: asyncio.Event, data_dir: Path) -> None:
    from marid.api import server
    from marid.scheduler import main as scheduler_main

    await cli.with_connection(cfg.database.dsn, db.migrate)
    admin = await cli.with_connection(cfg.database.dsn, _bootstrap_admin)
    cfg = await _choose_driver(cfg)
    api = await server.start(cfg)
    worker = asyncio.create_task(cli.run_runner(cfg, stop))
    scheduler = asyncio.create_task(scheduler_main.run(cfg, stop))
    try:
        _banner(cfg, data_dir, admin)
        await stop.wait()
    finally:
        await worker
        await scheduler
        await api.cleanup()


async def _choose_driver(cfg: config.Config) -> config.Config:
    """With the default `drivers`, run builds in Docker when an engine answers, else as local
    processes (os driver, no isolation) — and say which."""
    if cfg.drivers != config.Config().drivers:
        return cfg  # the configuration decides
    if await asyncio.to_thread(_docker_answers, cfg.docker.host):
        print(f"runner: Docker engine at {cfg.docker.host}: builds run in containers")
        return cfg
    print(
        f"runner: no Docker engine at {cfg.docker.host}: builds use the os driver "
        "(local processes, no isolation); manifests need `driver: {type: os}`"
    )
    return dataclasses.replace(cfg, drivers=["os"])


def _docker_answers(host: str) -> bool:
    try:
        import docker

        client = docker.DockerClient(base_url=host, timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


async def _bootstrap_admin(conn: asyncpg.Connection) -> tuple[str, str] | None:
    """On an empty database, create `admin` and a full-scope token; returns (password, token)."""
    async with conn.transaction():
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users)"):
            return None
        password = secrets.token_urlsafe(12)
        admin = await users.create(conn, "admin", "admin@localhost", password)
        _, token = await tokens.create(conn, admin, "marid-up", scopes.FULL)
        return password, token


def _banner(cfg: config.Config, data_dir: Path, admin: tuple[str, str] | None) -> None:
    config_path = data_dir / "marid.yml"
    lines = ["", "marid is up", f"  API:     {cfg.server.api_url}"]
    if admin is not None:
        password, token = admin
        lines += [
            f"  token:   {token}",
            f"  admin:   username admin, password {password}",
            "  (shown only now: marid keeps hashes, not these values)",
        ]
    else:
        lines += ["  the admin token was printed at first start; make another with:"]
    lines += [
        f'  more tokens: marid --config {config_path} token create --user admin --scope "..."',
        f"  try:     curl -H 'Authorization: Bearer <token>' {cfg.server.api_url}/user",
        "  stop:    Ctrl-C",
        "",
    ]
    print("\n".join(lines), flush=True)
