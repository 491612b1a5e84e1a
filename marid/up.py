"""`marid up`: the whole platform in one process, with no set-up.

Without `database.dsn` it runs a private PostgreSQL cluster in the data directory (kept
between starts), generates a crypto key there once, migrates, creates the `admin` user on
the first start and prints the API URL, a token and the admin password. Credentials a start
could not show are replaced by new ones at the next start. One `marid up` per data
directory: it holds an flock on `up.lock` there while it runs (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import sys
from pathlib import Path

import asyncpg
import yaml

from marid import cli, config, db, logs, scopes, tokens, users
from marid.pgcluster import Cluster, ClusterError, free_port, new_password

log = logging.getLogger(__name__)
FILLED = ("server.url", "database.dsn", "crypto.key")
LOCK = "up.lock"  # in the data directory: {"pid", "url"} of the `marid up` holding it
# The admin token keeps this name until the banner showing it has been written: a start
# that finds it knows its credentials were never seen and replaces them.
UNSHOWN, SHOWN = "marid-up (not shown yet)", "marid-up"
ADMIN = "admin"  # the user `marid up` creates on the first start


@dataclasses.dataclass(frozen=True)
class Credentials:
    """The admin's password and full-scope token, known only to the start that made them."""

    password: str
    token: str
    token_id: int
    replaced: bool  # an earlier start made credentials it never showed; these replace them


def run(args: argparse.Namespace) -> None:
    data_dir: Path = args.data_dir.resolve()
    cfg = cli.load_config(args, optional=FILLED)
    # Order matters (docs/architecture.md, `marid up`): a `marid up` already running on this
    # data directory is named before its port is found taken, and a taken port is reported
    # before anything is created.
    with contextlib.ExitStack() as held:
        lock = _lock(data_dir, held, create=False)
        sockets = cli.listen(args.host, args.port, "--port", "--host")
        for sock in sockets:
            held.enter_context(sock)
        if lock is None:
            lock = _lock(data_dir, held, create=True)
        assert lock is not None
        cfg = _fill_server(cfg, args.host, sockets[0].getsockname()[1])
        os.pwrite(lock, json.dumps({"pid": os.getpid(), "url": cfg.server.api_url}).encode(), 0)
        logs.configure(cfg.logging.level)
        _run_locked(cfg, data_dir, sockets, args.allow_os_driver)


def _lock(data_dir: Path, held: contextlib.ExitStack, create: bool) -> int | None:
    """Lock the data directory for the life of the process (an flock, which the OS releases
    however the process ends, kill -9 included); the open lock file, or None when `create`
    is false and there is none yet. Raises cli.Failure when another process holds it."""
    path = data_dir / LOCK
    try:
        if create:
            data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and not create:
            return None
        raise cli.Failure(cli.EXIT_USAGE, f"marid: cannot use {data_dir}: {exc.strerror}") from None
    held.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise cli.Failure(
            cli.EXIT_USAGE,
            f"marid: {data_dir} is in use by another marid up ({_holder(fd)}); "
            "stop it first, or choose another --data-dir",
        ) from None
    os.ftruncate(fd, 0)  # what an earlier holder wrote is stale now
    return fd


def _holder(fd: int) -> str:
    """Who holds the lock on `fd`, as they wrote it."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(holder['pid'])}, {holder['url']}"
    except (ValueError, KeyError, TypeError):
        return "starting"  # it has not written itself down yet


def _run_locked(
    cfg: config.Config, data_dir: Path, sockets: list[socket.socket], allow_os: bool
) -> None:
    """Start the cluster, then everything else, until a signal; stop the cluster last.
    Only the holder of the data directory's lock may call this."""
    cluster = None
    try:
        if not cfg.database.dsn:
            cluster = _embedded_cluster(data_dir / "postgres")
        cfg = _fill(cfg, data_dir, cluster)
        _write_effective_config(cfg, data_dir / "marid.yml")
        cli.run_async(cli.until_signal(lambda stop: _serve(cfg, stop, data_dir, sockets, allow_os)))
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
    # A `marid up` killed hard may have left it running; we hold the data directory's lock,
    # so no live `marid up` uses it.
    cluster.stop()
    cluster.start()
    return cluster


def _fill_server(cfg: config.Config, host: str, port: int) -> config.Config:
    """The server section for the socket bound on `host`:`port`, with `admin` among the
    administrators (docs/api.md §28)."""
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    admins = [*(u for u in cfg.server.admins if u != ADMIN), ADMIN]
    server = dataclasses.replace(cfg.server, listen=listen, admins=admins)
    if not server.url:
        url = f"http://{listen}"
        server = dataclasses.replace(server, url=url, api_url=url + "/api")
    return dataclasses.replace(cfg, server=server)


def _fill(cfg: config.Config, data_dir: Path, cluster: Cluster | None) -> config.Config:
    database = cfg.database
    if cluster is not None:
        database = dataclasses.replace(database, dsn=cluster.dsn())
    crypto = cfg.crypto
    if not crypto.key:
        crypto = dataclasses.replace(crypto, key=_crypto_key(data_dir / "crypto.key"))
    storage = cfg.storage
    if storage.backend == "fs" and storage.path == config.StorageConfig.path:
        storage = dataclasses.replace(storage, path=str(data_dir / "blobs"))  # keep it all together
    return dataclasses.replace(cfg, database=database, crypto=crypto, storage=storage)


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


async def _serve(
    cfg: config.Config,
    stop: asyncio.Event,
    data_dir: Path,
    sockets: list[socket.socket],
    allow_os: bool,
) -> None:
    from marid.api import server
    from marid.scheduler import main as scheduler_main

    # A configured database may not be up yet: wait for it (docs/configuration.md §2.2).
    conn = await db.wait_for(cfg.database.dsn, stop, lambda: cli.connect(cfg.database.dsn))
    if conn is None:
        return  # stopped while waiting
    try:
        await db.migrate(conn)
        admin = await _admin_credentials(conn)
    finally:
        await conn.close()
    cfg, driver_note = await _choose_driver(cfg, allow_os)
    api = await server.start(cfg, sockets)
    worker = asyncio.create_task(cli.run_runner(cfg, stop))
    scheduler = asyncio.create_task(scheduler_main.run(cfg, stop))
    try:
        _banner(cfg, data_dir, admin, driver_note)
        if admin is not None:
            token_id = admin.token_id
            await cli.with_connection(cfg.database.dsn, lambda conn: _mark_shown(conn, token_id))
        await stop.wait()
    finally:
        stop.set()  # after a failure above too: the runner and scheduler end with it
        await worker
        await scheduler
        await api.cleanup()


async def _choose_driver(cfg: config.Config, allow_os: bool) -> tuple[config.Config, str | None]:
    """The configuration to run with and a line saying where builds run (written with the
    banner, so stdout is written once). The `os` driver runs commands on this host with no
    isolation, so it is never enabled here unless `allow_os` (--allow-os-driver), and then for
    the admin alone (issue 11)."""
    if cfg.drivers != config.Config().drivers and not allow_os:
        return cfg, None  # the configuration decides
    if await asyncio.to_thread(_docker_answers, cfg.docker.host):
        note = f"runner: Docker engine at {cfg.docker.host}: builds run in containers"
        drivers = cfg.drivers
    elif allow_os:
        note = f"runner: no Docker engine at {cfg.docker.host}: docker builds are refused"
        drivers = [driver for driver in cfg.drivers if driver != "docker"]
    else:
        return cfg, (
            f"runner: no Docker engine at {cfg.docker.host}: builds need Docker and fail until "
            "one answers there (docker.host); or restart with --allow-os-driver to let "
            f"`{ADMIN}` alone run builds as local processes on this host (no isolation)"
        )
    if not allow_os:
        return cfg, note
    users = [*(u for u in cfg.os_driver.users or [] if u != ADMIN), ADMIN]
    os_driver = config.OsDriverConfig(users)
    drivers = drivers if "os" in drivers else [*drivers, "os"]
    cfg = dataclasses.replace(cfg, drivers=drivers, os_driver=os_driver)
    return cfg, (
        f"{note}\nrunner: `driver: {{type: os}}` builds (local processes, no isolation) "
        f"for {', '.join(users)} only (--allow-os-driver)"
    )


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


async def _admin_credentials(conn: asyncpg.Connection) -> Credentials | None:
    """The admin credentials to show: on an empty database, a new `admin` with a full-scope
    token; when an earlier start made them but never showed them (it died first, or could
    not write to stdout), a new password and token, the unshown token revoked. None when
    they were shown before."""
    async with conn.transaction():
        password = secrets.token_urlsafe(12)
        replaced = await users.any_exist(conn)
        if not replaced:
            admin = await users.create(conn, ADMIN, "admin@localhost", password)
        else:
            found = await users.get_by_username(conn, ADMIN)
            if found is None or not await tokens.delete_named(conn, found, UNSHOWN):
                return None
            admin = found
            await users.set_password(conn, admin, password)
        token, value = await tokens.create(conn, admin, UNSHOWN, scopes.FULL)
        return Credentials(password, value, token.id, replaced)


async def _mark_shown(conn: asyncpg.Connection, token_id: int) -> None:
    """Give the admin token its usual name, now that the banner showing it is written."""
    for name in (SHOWN, f"{SHOWN} {token_id}"):  # the second if someone took the first
        try:
            await tokens.rename(conn, token_id, UNSHOWN, name)
            return
        except asyncpg.UniqueViolationError:
            continue


def _program() -> str:
    """How this `marid` was run (.venv/bin/marid from scripts/up), so the banner's commands
    work as printed; plain `marid` when it was run some other way (python -m marid)."""
    return sys.argv[0] if Path(sys.argv[0]).name == "marid" else "marid"


def _banner(
    cfg: config.Config, data_dir: Path, admin: Credentials | None, note: str | None
) -> None:
    """Write the banner (after `note`) to stdout and flush it; raises cli.Failure when that
    fails (the credentials in it then count as never shown)."""
    config_path = data_dir / "marid.yml"
    lines = [*([note] if note else []), "", "marid is up", f"  API:     {cfg.server.api_url}"]
    if admin is not None:
        lines += [
            f"  token:   {admin.token}",
            f"  admin:   username admin, password {admin.password}",
            "  (shown only now: marid keeps hashes, not these values)",
        ]
        if admin.replaced:
            lines += ["  (an earlier start never showed its admin credentials: these replace them)"]
    else:
        lines += ["  the admin credentials were shown at an earlier start; make a token with:"]
    lines += [
        f"  more tokens: {_program()} --config {config_path} token create --user admin"
        ' --scope "build:read,write"',
        f"  try:     curl -H 'Authorization: Bearer <token>' {cfg.server.api_url}/user",
        "  stop:    Ctrl-C",
        "",
    ]
    try:
        if sys.stdout is None:
            raise OSError(errno.EBADF, "standard output is closed")
        print("\n".join(lines), file=sys.stdout, flush=True)
    except OSError as exc:
        _discard_stdout()
        raise cli.Failure(
            1,
            f"marid: cannot write to standard output ({exc.strerror}); the admin credentials "
            "were not shown, so the next start shows new ones",
        ) from None


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so what is left in its buffer cannot fail again at exit."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
