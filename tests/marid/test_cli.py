"""`marid user create`, `marid token create` and `marid runner-token` (docs/configuration.md
§2), run as real processes."""

import hashlib
import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
import yaml

from marid import scopes


@pytest.fixture
def config_file(tmp_path: Path, db_dsn: str) -> Path:
    path = tmp_path / "marid.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"url": "https://ci.example.com"},
                "database": {"dsn": db_dsn},
                "crypto": {"key": "k" * 32},
            }
        )
    )
    return path


def marid(config_file: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    # --config after the sub-command, as docs/configuration.md §2 allows.
    return subprocess.run(
        [sys.executable, "-m", "marid", *args, "--config", str(config_file)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_user_create_prints_one_json_line(config_file: Path, pool: asyncpg.Pool):
    result = marid(
        config_file,
        "user",
        "create",
        "--username",
        "meg",
        "--email",
        "me@x.org",
        "--password",
        "hunter22",
    )
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout)
    assert list(line) == ["id", "username", "email", "created_at"]
    assert line["username"] == "meg" and line["email"] == "me@x.org"
    assert result.stdout.count("\n") == 1
    stored = await pool.fetchval("SELECT password_hash FROM users WHERE username = 'meg'")
    assert stored.startswith("scrypt$") and "hunter22" not in stored


async def test_user_create_reads_password_from_stdin(config_file: Path, pool: asyncpg.Pool):
    result = marid(
        config_file, "user", "create", "--username", "meg", "--email", "m@x", "--password", "-",
        stdin="from-stdin\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    basic = marid(
        config_file,
        "user",
        "create",
        "--username",
        "meg2",
        "--email",
        "m2@x",
        "--password",
        "-",
        stdin="",
    )
    assert basic.returncode == 1
    assert basic.stderr == "password: Password field required\n"


async def test_user_create_validation_lines_and_status(config_file: Path, pool: asyncpg.Pool):
    result = marid(
        config_file, "user", "create", "--username", "a b", "--email", "nope", "--password", "12345"
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "email: Email invalid",
        "username: Username can only have letters, numbers, dots, and dashes",
        "password: Password must be between 6 and 60 characters in length",
    ]
    ok = ["--email", "a@x", "--password", "secret1"]
    assert marid(config_file, "user", "create", "--username", "taken", *ok).returncode == 0
    again = marid(
        config_file,
        "user",
        "create",
        "--username",
        "taken",
        "--email",
        "b@x",
        "--password",
        "secret1",
    )
    assert (again.returncode, again.stderr) == (1, "username: Username already exists\n")
    same_email = marid(config_file, "user", "create", "--username", "other", *ok)
    assert (same_email.returncode, same_email.stderr) == (1, "email: Email already exists\n")
    assert await pool.fetchval("SELECT count(*) FROM users") == 1


async def test_token_create_prints_only_the_value(config_file: Path, pool: asyncpg.Pool):
    marid(
        config_file,
        "user",
        "create",
        "--username",
        "meg",
        "--email",
        "me@x.org",
        "--password",
        "hunter22",
    )
    result = marid(
        config_file, "token", "create", "--user", "me@x.org", "--scope", "namespace:read build:read"
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"mrd_[0-9a-f]{64}\n", result.stdout)
    row = await pool.fetchrow("SELECT name, scope FROM tokens")
    assert row["scope"] == "build:read namespace:read"
    assert re.fullmatch(r"cli-\d{8}T\d{6}Z", row["name"])


async def test_token_create_errors(config_file: Path, pool: asyncpg.Pool):
    unknown = marid(config_file, "token", "create", "--user", "ghost", "--scope", "")
    assert (unknown.returncode, unknown.stderr) == (1, "user: No such user\n")
    bad_scope = marid(config_file, "token", "create", "--user", "ghost", "--scope", "build:fly")
    assert bad_scope.returncode == 1
    assert bad_scope.stderr.splitlines() == [
        "scope: Scope unknown permission: fly",
        "user: No such user",
    ]
    usage = marid(config_file, "token", "create", "--user", "ghost")
    assert usage.returncode == 2
    assert "--scope" in usage.stderr


async def test_runner_token_create_list_and_revoke(config_file: Path, pool: asyncpg.Pool):
    result = marid(
        config_file, "runner-token", "create", "--name", "hosts", "--expires-in", "1h30m"
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"mre_[A-Za-z0-9_-]{43}\n", result.stdout)
    value = result.stdout.strip()
    row = await pool.fetchrow(
        "SELECT id, token_digest, created_by, expires_at - created_at AS lifetime"
        " FROM runner_enrolments"
    )
    assert row["token_digest"] == hashlib.sha256(value.encode()).hexdigest()
    assert row["created_by"] is None and row["lifetime"] == timedelta(hours=1, minutes=30)
    forever = marid(config_file, "runner-token", "create", "--name", "forever")
    assert forever.returncode == 0, forever.stderr

    listed = marid(config_file, "runner-token", "list")
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(t["id"], t["name"], t["created_by"]) for t in lines] == [
        (row["id"], "hosts", None),
        (row["id"] + 1, "forever", None),
    ]
    assert lines[0]["url"] == f"https://ci.example.com/api/runner-tokens/{row['id']}"
    assert lines[1]["expires_at"] is None and value not in listed.stdout

    revoked = marid(config_file, "runner-token", "revoke", str(row["id"]))
    assert (revoked.returncode, revoked.stdout, revoked.stderr) == (0, "", "")
    assert await pool.fetchval("SELECT array_agg(name) FROM runner_enrolments") == ["forever"]
    again = marid(config_file, "runner-token", "revoke", str(row["id"]))
    assert (again.returncode, again.stderr) == (1, f"id: No runner token {row['id']}\n")


async def test_runner_token_create_errors(config_file: Path, pool: asyncpg.Pool):
    blank = marid(config_file, "runner-token", "create", "--name", " ")
    assert (blank.returncode, blank.stderr) == (1, "name: Name field required\n")
    soon = marid(config_file, "runner-token", "create", "--name", "n", "--expires-in", "soon")
    assert soon.returncode == 2
    assert "argument --expires-in: invalid duration 'soon': use a duration such as 90s" in (
        soon.stderr
    )
    for duration in ("0s", "87601h"):  # ten years are 87600h
        bad = marid(config_file, "runner-token", "create", "--name", "n", "--expires-in", duration)
        assert bad.returncode == 1
        assert bad.stderr == "expires_in: Expires in must be a number of seconds up to ten years\n"
    usage = marid(config_file, "runner-token", "create")
    assert usage.returncode == 2 and "--name" in usage.stderr
    assert marid(config_file, "runner-token", "revoke", "one").returncode == 2
    assert await pool.fetchval("SELECT count(*) FROM runner_enrolments") == 0


def test_database_error_is_status_3(tmp_path: Path):
    path = tmp_path / "marid.yml"
    path.write_text(
        "server: {url: http://x}\ndatabase: {dsn: 'postgresql://u:p@127.0.0.1:1/x'}\n"
        f"crypto: {{key: {'k' * 32}}}\n"
    )
    result = marid(path, "migrate")
    assert result.returncode == 3
    assert result.stderr.startswith("marid: database error:")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--server", "http://127.0.0.1:1/api"), "--server needs an enrolment token"),
        (("--server", "http://127.0.0.1:1/api", "--token", "mrd_x"), "needs an enrolment token"),
        (("--server", "ftp://127.0.0.1:1", "--token", "mre_x"), "not an http(s) URL"),
        (("--token", "mre_x"), "--token needs --server"),
    ],
)
def test_a_remote_runner_needs_a_server_url_and_a_runner_token(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    """`marid runner --server` needs no configuration file; what it needs it says."""
    result = subprocess.run(
        [sys.executable, "-m", "marid", "runner", *args, "--config", str(tmp_path / "none.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "MARID_RUNNER_TOKEN"},
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_revoked_remote_runner_exits_with_status_1(tmp_path: Path) -> None:
    """Refused at registration (an unknown enrolment token here), the runner says why and
    exits 1. The API answering is a loopback server of this test's own."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = b'{"message": "Unknown or expired enrolment token", "revoked": false}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "marid",
                "runner",
                "--server",
                url,
                "--token",
                "mre_x",
                "--config",
                str(tmp_path / "none.yml"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1, result.stderr
    assert "Unknown or expired enrolment token" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_command_has_useful_help():
    for args in (["--help"], ["up", "--help"], ["serve", "--help"], ["migrate", "--help"],
                 ["user", "create", "--help"], ["token", "create", "--help"],
                 ["runner-token", "create", "--help"]):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "marid", *args], capture_output=True, text=True
        )
        assert result.returncode == 0, args
        assert "usage: marid" in result.stdout
        assert len(result.stdout.splitlines()) > 5, args
    assert scopes.RESOURCES[0] == "build"
