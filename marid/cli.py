"""The `marid` command line: the composition root that starts every process.

Exit status: 0 success · 1 validation error or unknown user · 2 usage or configuration
error · 3 database error (docs/configuration.md §2).
A port that cannot be listened on, or a data directory another `marid up` holds, is a
usage error (2); `marid up` ends with 1 when it cannot write its banner to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import asyncpg

from marid import __version__, config, db, logs, tokens, users
from marid.pgcluster import ClusterError
from marid.validation import Errors, ValidationError

EXIT_INVALID, EXIT_USAGE, EXIT_DATABASE = 1, 2, 3


class Failure(Exception):
    """Ends the command with one message per line on stderr and an exit status."""

    def __init__(self, status: int, *lines: str) -> None:
        super().__init__(*lines)
        self.status = status
        self.lines = lines


def main(argv: list[str] | None = None) -> NoReturn:
    args = parser().parse_args(argv)
    if not getattr(args, "run", None):
        parser().print_help()
        sys.exit(EXIT_USAGE)
    try:
        args.run(args)
    except Failure as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        sys.exit(exc.status)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="configuration file (default: $MARID_CONFIG, else ./marid.yml)",
    )
    top = argparse.ArgumentParser(
        prog="marid",
        parents=[common],
        description="marid: a continuous-integration and build platform.",
        epilog="Start here: `marid up` runs everything on this machine with no set-up. "
        "`marid COMMAND --help` describes each command.",
    )
    top.add_argument("--version", action="version", version=f"marid {__version__}")
    commands = top.add_subparsers(metavar="COMMAND")

    up = commands.add_parser(
        "up",
        parents=[common],
        help="run the whole platform on this machine (embedded PostgreSQL if none configured)",
        description="Run the API, a runner and the scheduler in one process. "
        "Without database.dsn in the configuration it starts a private PostgreSQL in "
        "--data-dir, keeps a generated crypto key there, applies migrations and, on first "
        "start, creates the user `admin` and prints an access token. No configuration file "
        "is needed. Builds run in Docker; the os driver only with --allow-os-driver. Stop with "
        "Ctrl-C; data is kept for the next start.",
    )
    up.add_argument("--data-dir", type=Path, default=Path(".marid"), help="default: ./.marid")
    up.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    up.add_argument(
        "--allow-os-driver",
        action="store_true",
        help="let the user `admin`, and nobody else, submit `driver: {type: os}` builds, which "
        "run as local processes of this marid up with no isolation (default: no one may; "
        "builds need Docker)",
    )
    up.set_defaults(run=lambda a: _lazy("marid.up").run(a))

    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="run the API server",
        description="Serve the REST API on server.listen. Stateless: run as many as you like "
        "against one database. Apply migrations first with `marid migrate`.",
    )
    serve.set_defaults(run=_serve)

    runner = commands.add_parser(
        "runner",
        parents=[common],
        help="run builds: claim queued builds and execute them",
        description="Claim queued builds and execute them with the drivers listed in "
        "`drivers`, up to runner.parallelism at once. Run one or more per build host; a build "
        "whose runner dies is picked up again after its lease (runner.lease) expires. With "
        "--server it works through the API of another machine and needs no database DSN and "
        "no crypto key (docs/runners.md); without, it connects to database.dsn.",
    )
    runner.add_argument(
        "--server",
        metavar="URL",
        help="the API's URL (server.api_url, e.g. https://ci.example.com/api) to get builds "
        "from, instead of the database",
    )
    runner.add_argument(
        "--token",
        metavar="TOKEN",
        help="with --server: an enrolment token (`marid runner-token create`) or a runner "
        "token (default: $MARID_RUNNER_TOKEN; --token-file reads it from a file)",
    )
    runner.add_argument("--token-file", type=Path, metavar="PATH", help="read --token from PATH")
    runner.set_defaults(run=_runner)

    scheduler = commands.add_parser(
        "scheduler",
        parents=[common],
        help="run cron jobs and deliver webhooks",
        description="Claim the due cron jobs from the database, submit one build for each and "
        "move its next run on, in batches; check again at the earliest next run, and at least "
        "every cron.interval. Run as many as you like against "
        "one database: each run fires exactly once, even when a scheduler dies mid-batch. A run "
        "missed while no scheduler was up fires once at the next check. Also sends queued "
        "webhook deliveries, retrying with backoff those that got no answer or a 5xx.",
    )
    scheduler.set_defaults(run=_scheduler)

    run = commands.add_parser(
        "run",
        parents=[common],
        help="run a manifest locally, without a server (docker or os driver)",
        description="Execute a build manifest on this machine with the docker or os driver, "
        "no server or database needed. Objects are read by name from --objects; artifacts are "
        "written under their names to --artifacts. Exit status: 0 passed (or passed with "
        "failures), 1 any other result, 2 invalid manifest or usage.",
    )
    run.add_argument("--manifest", type=Path, help="default: .marid.yml, else .djinn.yml")
    run.add_argument("--stage", help="run only the setup stage and this stage")
    run.add_argument("--objects", type=Path, default=Path("."), help="default: .")
    run.add_argument("--artifacts", type=Path, default=Path("."), help="default: .")
    run.add_argument(
        "--pull",
        choices=config.PULL_POLICIES,
        default="if-not-present",
        help="docker driver: pull the image if the engine lacks it (default), always, or never",
    )
    run.set_defaults(run=_run_offline)

    migrate = commands.add_parser(
        "migrate",
        parents=[common],
        help="apply pending database migrations",
        description="Apply the numbered SQL files of migrations/ that the database has not seen, "
        "each in its own transaction. Safe to run twice, or twice at once.",
    )
    migrate.set_defaults(run=_migrate)

    user = commands.add_parser("user", help="manage users").add_subparsers(metavar="ACTION")
    create_user = user.add_parser(
        "create",
        parents=[common],
        help="create a user",
        description="Create a user directly in the database (the server need not run). "
        "Prints the user as one JSON line.",
    )
    create_user.add_argument("--username", required=True)
    create_user.add_argument("--email", required=True)
    create_user.add_argument(
        "--password", required=True, help="6 to 60 characters; `-` reads it from standard input"
    )
    create_user.set_defaults(run=_create_user)

    token = commands.add_parser("token", help="manage access tokens").add_subparsers(
        metavar="ACTION"
    )
    create_token = token.add_parser(
        "create",
        parents=[common],
        help="create a personal access token",
        description="Create a personal access token for a user and print its value (shown "
        "only this once; marid keeps just a hash).",
        epilog='Example: marid token create --user me --scope "build:read,write namespace:read"',
    )
    create_token.add_argument("--user", required=True, help="username or email")
    create_token.add_argument(
        "--scope", required=True, help='scope string such as "build:read,write" ("" grants nothing)'
    )
    create_token.add_argument("--name", help="default: cli-<UTC time>")
    create_token.set_defaults(run=_create_token)

    runner_token = commands.add_parser(
        "runner-token", help="manage the enrolment tokens of runners on other machines"
    ).add_subparsers(metavar="ACTION")
    create_runner_token = runner_token.add_parser(
        "create",
        parents=[common],
        help="create a runner enrolment token",
        description="Create an enrolment token, with which runners on other machines register "
        "(marid runner --server), and print its value (shown only this once; marid keeps just "
        "a hash). Any number of runners may register with it until it expires or is revoked.",
        epilog="Example: marid runner-token create --name build-hosts --expires-in 24h",
    )
    create_runner_token.add_argument("--name", required=True, help="1 to 255 characters")
    create_runner_token.add_argument(
        "--expires-in",
        metavar="DURATION",
        type=_duration,
        help="a duration such as 90s, 30m or 1h30m (at most ten years); default: never",
    )
    create_runner_token.set_defaults(run=_create_runner_token)
    list_runner_tokens = runner_token.add_parser(
        "list",
        parents=[common],
        help="list the runner enrolment tokens",
        description="Print each runner enrolment token (never its value) as one JSON line, "
        "oldest first.",
    )
    list_runner_tokens.set_defaults(run=_list_runner_tokens)
    revoke_runner_token = runner_token.add_parser(
        "revoke",
        parents=[common],
        help="revoke a runner enrolment token",
        description="Revoke a runner enrolment token: no runner registers with it any more. "
        "Runners that registered with it keep working; revoke those with DELETE /runners/ID.",
    )
    revoke_runner_token.add_argument("id", type=int, metavar="ID", help="the token's id")
    revoke_runner_token.set_defaults(run=_revoke_runner_token)
    return top


def _lazy(module: str) -> Any:
    """Import a process's module only when its command runs (keeps `--help` fast)."""
    import importlib

    return importlib.import_module(module)


def load_config(args: argparse.Namespace, optional: tuple[str, ...] = ()) -> config.Config:
    try:
        return config.load(config.locate(getattr(args, "config", None)), optional)
    except config.ConfigError as exc:
        raise Failure(EXIT_USAGE, f"marid: configuration error: {exc}") from None


def run_async(work: Coroutine[Any, Any, Any]) -> Any:
    """Run `work`, turning database failures into exit status 3."""
    try:
        return asyncio.run(work)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ClusterError) as exc:
        raise Failure(EXIT_DATABASE, f"marid: database error: {exc}") from None


async def connect(dsn: str) -> asyncpg.Connection:
    """One connection, in UTC as the pool's (marid/db.py)."""
    return await asyncpg.connect(dsn, server_settings={"timezone": "UTC"})


async def with_connection(dsn: str, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    conn = await connect(dsn)
    try:
        return await work(conn)
    finally:
        await conn.close()


def listen(host: str, port: int, port_option: str, host_option: str) -> list[socket.socket]:
    """The API's listening sockets, bound now; else one line saying why and what to change
    (`port_option`/`host_option` name the setting, e.g. `--port` or `server.listen`)."""
    server = _lazy("marid.api.server")
    try:
        return list(server.bind(host, port))
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = exc.strerror or str(exc)
        taken = exc.errno in (errno.EADDRINUSE, errno.EACCES)
        hint = f"choose another with {port_option}" if taken else f"check {host_option}"
        raise Failure(
            EXIT_USAGE, f"marid: cannot listen on {where}: {reason[:1].lower()}{reason[1:]}; {hint}"
        ) from None


def _serve(args: argparse.Namespace) -> None:
    cfg = load_config(args)
    logs.configure(cfg.logging.level)
    server = _lazy("marid.api.server")
    host, port = server.split_listen(cfg.server.listen)
    sockets = listen(host, port, "server.listen", "server.listen")
    run_async(until_signal(lambda stop: server.serve_until(cfg, stop, sockets)))


def _run_offline(args: argparse.Namespace) -> None:
    logs.configure("warning")
    status = _lazy("marid.runner.offline").main(args)
    if status:
        raise Failure(status)


def _runner(args: argparse.Namespace) -> None:
    if args.server is None:
        if args.token or args.token_file:
            raise Failure(EXIT_USAGE, "marid runner: --token needs --server")
        cfg = load_config(args)
        logs.configure(cfg.logging.level)
        run_async(until_signal(lambda stop: run_runner(cfg, stop)))
        return
    # A runner on another machine: no database, no crypto key, no server of its own.
    cfg = load_config(args, optional=("server.url", "database.dsn", "crypto.key"))
    logs.configure(cfg.logging.level)
    token = _runner_token(args)
    url = args.server.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Failure(EXIT_USAGE, f"marid runner: --server {url}: not an http(s) URL")
    if not parts.path:  # the server's root: its API is under /api (server.api_url's default)
        url += "/api"
    ended: list[str] = []

    async def work(stop: asyncio.Event) -> None:
        ended.append(await run_remote_runner(cfg, url, token, stop))

    asyncio.run(until_signal(work))
    if ended and ended[0]:
        raise Failure(EXIT_INVALID, ended[0])


def _runner_token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise Failure(EXIT_USAGE, f"marid runner: --token-file: {exc.strerror}") from None
    else:
        token = args.token or os.environ.get("MARID_RUNNER_TOKEN", "")
    if not token.startswith(("mre_", "mrr_")):
        raise Failure(
            EXIT_USAGE,
            "marid runner: --server needs an enrolment token (mre_…, from `marid runner-token"
            " create`) or a runner token (mrr_…) in --token, --token-file or"
            " $MARID_RUNNER_TOKEN",
        )
    return token


async def run_remote_runner(cfg: config.Config, url: str, token: str, stop: asyncio.Event) -> str:
    """A runner working through the API at `url`, until `stop` is set; returns why it ended
    on its own ("" when stopped)."""
    from marid.runner.backend import RunnerRevoked
    from marid.runner.remote import HttpBackend
    from marid.runner.worker import Worker

    try:
        await Worker(cfg, backend=HttpBackend(cfg, url, token)).run(stop)
    except RunnerRevoked as exc:
        return f"marid runner: {exc}"
    return ""


async def run_runner(cfg: config.Config, stop: asyncio.Event) -> None:
    """A runner with its own pool and blob store, until `stop` is set. It waits for the
    database first (docs/configuration.md §2.4); stopped meanwhile, it returns."""
    from marid.blobs import open_store
    from marid.runner.worker import Worker

    pool = await db.open_pool(cfg.database.dsn, cfg.database.pool_size, stop)
    if pool is None:
        return
    blobs = open_store(cfg.storage)
    try:
        await Worker(cfg, pool, blobs).run(stop)
    finally:
        await blobs.close()
        await pool.close()


def _scheduler(args: argparse.Namespace) -> None:
    cfg = load_config(args)
    logs.configure(cfg.logging.level)
    run_async(until_signal(lambda stop: _lazy("marid.scheduler.main").run(cfg, stop)))


async def until_signal(work: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `work(stop)`; SIGINT or SIGTERM sets `stop` for a clean shutdown."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await work(stop)


def _migrate(args: argparse.Namespace) -> None:
    cfg = load_config(args)
    applied = run_async(with_connection(cfg.database.dsn, db.migrate))
    print("\n".join(f"applied {name}" for name in applied) or "database is up to date")


def _create_user(args: argparse.Namespace) -> None:
    cfg = load_config(args)
    password = sys.stdin.readline().rstrip("\r\n") if args.password == "-" else args.password

    async def create(conn: asyncpg.Connection) -> users.User:
        return await users.create(conn, args.username, args.email, password)

    try:
        user = run_async(with_connection(cfg.database.dsn, create))
    except ValidationError as exc:
        raise Failure(EXIT_INVALID, *_field_lines(exc.errors)) from None
    created = {"id": user.id, **users.to_json(user)}
    print(json.dumps({k: created[k] for k in ("id", "username", "email", "created_at")}))


def _create_token(args: argparse.Namespace) -> None:
    cfg = load_config(args)
    name = args.name or "cli-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    errors = Errors()
    scope = tokens.check_new_token(name, args.scope, errors)

    async def create(conn: asyncpg.Connection) -> str:
        user = await users.get_by_handle(conn, args.user)
        if user is None:
            errors.add("user", "No such user")
        errors.raise_if_any()
        assert user is not None and scope is not None
        _, value = await tokens.create(conn, user, name, scope)
        return value

    try:
        print(run_async(with_connection(cfg.database.dsn, create)))
    except ValidationError as exc:
        raise Failure(EXIT_INVALID, *_field_lines(exc.errors)) from None


def _duration(text: str) -> float:
    """Seconds for a duration as the configuration writes them (1h30m); a bare number is
    seconds."""
    try:
        return float(text) if text.isdigit() else config.parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a duration such as 90s or 1h30m"
        ) from None


def _create_runner_token(args: argparse.Namespace) -> None:
    cfg = load_config(args)
    remote = _lazy("marid.remote")  # runs the build lifecycle's imports: not for every command
    errors = Errors()
    remote.check_enrolment(args.name, args.expires_in, errors)
    if errors.by_field:
        raise Failure(EXIT_INVALID, *_field_lines(errors.by_field))

    async def create(conn: asyncpg.Connection) -> str:
        _, value = await remote.create_enrolment(conn, args.name, None, args.expires_in)
        return value

    print(run_async(with_connection(cfg.database.dsn, create)))


def _list_runner_tokens(args: argparse.Namespace) -> None:
    cfg = load_config(args)
    remote = _lazy("marid.remote")
    found = run_async(with_connection(cfg.database.dsn, remote.list_enrolments))
    for enrolment in found:
        print(json.dumps(remote.enrolment_json(enrolment, cfg.server.api_url)))


def _revoke_runner_token(args: argparse.Namespace) -> None:
    cfg = load_config(args)
    remote = _lazy("marid.remote")

    async def revoke(conn: asyncpg.Connection) -> bool:
        return await remote.delete_enrolment(conn, args.id)

    if not run_async(with_connection(cfg.database.dsn, revoke)):
        raise Failure(EXIT_INVALID, f"id: No runner token {args.id}")


def _field_lines(errors: dict[str, list[str]]) -> list[str]:
    return [f"{name}: {message}" for name, messages in errors.items() for message in messages]
