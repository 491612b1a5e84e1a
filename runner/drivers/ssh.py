"""The ssh driver (docs/manifest.md §9.5): every job runs as `root` on `driver.address` over SSH.

The runner authenticates with the key of config `ssh_driver` and accepts the host only if its
key is in `ssh_driver.known_hosts` (docs/configuration.md §1.3). One connection serves the
build: files go over SFTP, each job is one exec channel running `/bin/sh` on its script in the
build's workspace, a directory made on the host for this attempt (`/tmp/marid-…/workspace`).

A job's shell is the leader of its own process group (sshd starts every command in a new
session), and writes its pid to a file first: stop() signals that group through a second
channel, as the os driver signals its local one. destroy() removes the attempt's directory and
undoes what the build wrote outside it (keys, the SSH config, absolute objects): files it
created are removed, files it replaced get their earlier content back.

Failing to connect, to authenticate or to verify the host key fails create-driver with the
reason; it is not retried as an infrastructure failure: the address is the build's own, like
its commands, and a new attempt would only say the same later (docs/manifest.md §6.13).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import re
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from marid.runner.drivers.base import (
    Driver,
    DriverError,
    Exit,
    OutputSink,
    SshKey,
    TooLarge,
    exited,
    signalled,
)

log = logging.getLogger(__name__)
GRACE = 10.0  # seconds between SIGTERM and SIGKILL (docs/manifest.md §6.10)
DRAIN = 1.0  # seconds a job's output may stay open after its shell exited
KEEPALIVE = 15.0  # seconds between keepalives: a host that vanished ends the job, not its limit
KEEPALIVE_MISSED = 4
READ_SIZE = 65536
SSH_DIR = "/root/.ssh"
SSH_CONFIG_HEAD = "\nStrictHostKeyChecking no\nUserKnownHostsFile /dev/null\n\n"
FILE_REGULAR, FILE_DIRECTORY = 1, 2  # SFTP file types (asyncssh.FILEXFER_TYPE_*)
# Markers on the stderr of the cache's tar commands (archive, extract).
_MISSING, _FAILED = "marid-cache-missing:", "marid-cache-tar-failed"


@dataclass(frozen=True)
class Target:
    """How to reach the host: the manifest's address, the runner's credentials."""

    address: str  # driver.address: host:port
    user: str
    key: asyncssh.SSHKey
    known_hosts: str  # path of an OpenSSH known_hosts file
    connect_timeout: float


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (port 22 when absent; `[v6]:port` for IPv6) as (host, port); raises
    DriverError."""
    text = address.strip()
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest or "22"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:  # a name, or an IPv6 address without a port
        host, port = text, "22"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DriverError(f"driver.address {address!r}: expected host:port")
    return host, int(port)


def load_key(path: str) -> asyncssh.SSHKey:
    """The private key at `path` (config ssh_driver.key); raises ValueError saying why."""
    try:
        return asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ValueError(f"{path}: {describe(exc)}") from None


def check_known_hosts(path: str) -> None:
    """Raise ValueError unless `path` is a readable known_hosts file."""
    try:
        asyncssh.read_known_hosts(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {describe(exc)}") from None


class SshDriver(Driver):
    def __init__(self, target: Target, name: str, workspace: str = "") -> None:
        """`workspace`, when given, is the jobs' working directory on a throwaway host (the
        qemu driver's VM, docs/manifest.md §9.6): nothing written there is undone, as the
        host is discarded. Else it is a directory of this attempt's, undone by destroy()."""
        self.target = target
        self.name = name  # unique per installation, build and attempt; names the directory
        self.fixed = workspace
        self.conn: asyncssh.SSHClientConnection | None = None
        self.sftp: asyncssh.SFTPClient | None = None
        self.root = ""  # the attempt's directory on the host: workspace, job script, pid file
        self.clear = ""  # the prefix of earlier attempts' directories, to remove at create()
        self.channel: asyncssh.SSHClientChannel[bytes] | None = None
        self.stopping: asyncio.Task[None] | None = None
        self.stopped = False
        self.created: list[str] = []  # files and directories made outside the workspace
        self.replaced: dict[str, tuple[bytes, int]] = {}  # path: earlier content and mode

    @property
    def workspace(self) -> str:
        return self.fixed or f"{self.root}/workspace"

    async def clear_previous(self) -> None:
        """Earlier attempts' jobs are killed and their directories removed once connected."""
        self.clear = self.name.rpartition("-")[0] + "-"  # <build>-<attempt>: any attempt

    async def create(self, out: OutputSink) -> None:
        """Connect (unless a connection was handed over in `conn`), make the directories."""
        t = self.target
        host, port = parse_address(t.address)
        where = f"{t.user}@{_joined(host, port)}"
        try:
            if self.conn is None:
                await out(f"Connecting to {where}\n".encode())
                self.conn = await asyncio.wait_for(self._connect(host, port), t.connect_timeout)
            self.sftp = await self.conn.start_sftp_client()
        except TimeoutError:
            raise DriverError(
                f"cannot connect to {where}: no answer within {t.connect_timeout:g}s"
            ) from None
        except asyncssh.HostKeyNotVerifiable as exc:
            raise DriverError(
                f"cannot connect to {where}: the host key is not in ssh_driver.known_hosts"
                f" ({exc.reason})"
            ) from None
        except asyncssh.PermissionDenied:
            raise DriverError(
                f"cannot connect to {where}: the host refused the runner's key (ssh_driver.key)"
            ) from None
        except (OSError, asyncssh.Error) as exc:
            raise DriverError(f"cannot connect to {where}: {describe(exc)}") from None
        if self.clear:
            await self._shell(f"{_CLEAR} {shlex.quote('/tmp/' + self.clear)}")
        template = shlex.quote(f"/tmp/{self.name}-XXXXXXXX")
        workspace = shlex.quote(self.fixed) if self.fixed else '"$root/workspace"'
        made = await self._shell(
            f'root=$(mktemp -d {template}) && mkdir -p {workspace} && echo "$root"'
        )
        self.root = made.strip()
        await out(f"Connected to {where}; workspace {self.workspace}\n".encode())

    async def _connect(self, host: str, port: int) -> asyncssh.SSHClientConnection:
        return await connect(self.target, host, port)

    async def sync(self) -> None:
        """Flush the host's file system buffers to disk (`sync`); DriverError if it fails."""
        await self._shell("sync")

    async def _shell(self, command: str) -> str:
        """Run `command` on the host; its stdout. Raises DriverError with its stderr."""
        assert self.conn is not None
        try:
            done = await self.conn.run(command, encoding="utf-8", errors="replace")
        except (OSError, asyncssh.Error) as exc:
            raise DriverError(f"connection to the host lost: {describe(exc)}") from None
        if done.exit_status != 0:
            error = str(done.stderr or "").strip() or f"exit status {done.exit_status}"
            raise DriverError(error)
        return str(done.stdout or "")

    def _path(self, path: str) -> str:
        """`path` on the host: relative paths are in the workspace."""
        return posixpath.normpath(posixpath.join(self.workspace, path))

    def _undoable(self, path: str) -> bool:
        """Whether destroy() must undo writing `path`: outside the attempt's directory on a
        host that is kept."""
        return not self.fixed and not path.startswith(self.root + "/")

    async def place_object(self, content: Path, destination: str) -> str:
        path = self._path(destination)
        try:
            await self._write(path, await asyncio.to_thread(content.read_bytes), 0o644)
        except (OSError, asyncssh.SFTPError) as exc:
            raise DriverError(f"{destination}: {describe(exc)}") from None
        return path

    async def write_keys(self, keys: list[SshKey]) -> dict[str, str]:
        ordered = sorted(keys, key=lambda key: key.name)
        config = SSH_CONFIG_HEAD + "".join(key.config + "\n" for key in ordered)
        files = [(f"{SSH_DIR}/{key.name}", key.private_key.encode()) for key in ordered]
        try:
            for path, data in [*files, (f"{SSH_DIR}/config", config.encode())]:
                await self._write(path, data, 0o600)
        except (OSError, asyncssh.SFTPError) as exc:
            raise DriverError(f"{SSH_DIR}: {describe(exc)}") from None
        return {key.name: f"{SSH_DIR}/{key.name}" for key in ordered}

    async def _write(self, path: str, data: bytes, mode: int) -> None:
        """Write `path` with `mode`, its parents made; outside the workspace, remember how to
        undo it."""
        sftp = self._require_sftp()
        await self._parents(posixpath.dirname(path))
        if self._undoable(path) and path not in self.replaced and path not in self.created:
            try:
                attrs = await sftp.lstat(path)
            except asyncssh.SFTPNoSuchFile:
                self.created.append(path)
            else:
                if attrs.type == FILE_REGULAR:
                    async with sftp.open(path, "rb") as file:
                        earlier = await file.read()
                    assert isinstance(earlier, bytes)  # opened in binary mode
                    self.replaced[path] = (earlier, (attrs.permissions or 0o644) & 0o7777)
        async with sftp.open(path, "wb") as file:
            await file.write(data)
        await sftp.chmod(path, mode)

    async def _parents(self, directory: str) -> None:
        """Make `directory` and its missing parents (`/root/.ssh` gets mode 0700)."""
        sftp = self._require_sftp()
        missing = []
        while directory not in ("/", "") and not await sftp.isdir(directory):
            missing.append(directory)
            directory = posixpath.dirname(directory)
        for path in reversed(missing):
            await sftp.mkdir(
                path, asyncssh.SFTPAttrs(permissions=0o700 if path == SSH_DIR else 0o755)
            )
            if self._undoable(path):
                self.created.append(path)

    async def run(self, job: str, script: str, env: dict[str, str], out: OutputSink) -> Exit:
        """Run the script, the build's variables exported before it, in the workspace."""
        if self.stopped:
            return exited(128 + signal.SIGKILL)
        session = await self._start(script, env)
        pump = asyncio.create_task(self._pump(session, out))
        try:
            exiting = asyncio.ensure_future(session.exited.wait())
            try:
                await asyncio.wait({pump, exiting}, return_when="FIRST_COMPLETED")
            finally:
                exiting.cancel()
            if not await _finished(pump, DRAIN):
                # The shell is gone and a background process (`server &`) holds the output
                # open: end the job's process group, as the os driver does.
                log.info("job %s: killing what it left running in the background", job)
                await self._signal(signal.SIGKILL)
                if not await _finished(pump, DRAIN):
                    raise DriverError("a background process of the job keeps its output open")
            pump.result()
            if self.sftp is not None:  # None once destroyed, as after a kill
                with contextlib.suppress(asyncssh.SFTPError, OSError):  # no reused pid hit later
                    await self.sftp.remove(f"{self.root}/job.pid")
            return session.ending()
        except asyncio.CancelledError:
            await _finished(pump, DRAIN)  # what the job wrote last is still passed on
            raise
        finally:
            pump.cancel()
            await asyncio.wait((pump,))
            if not pump.cancelled():
                pump.exception()
            if self.channel is not None:
                self.channel.close()
            self.channel = None

    async def _start(self, script: str, env: dict[str, str]) -> _Session:
        """Write the job script (mode 0600: masked values are in it) and start it."""
        # Names the shell cannot export (docker would pass them on) are left out.
        exports = "".join(
            f"export {key}={shlex.quote(value)}\n"
            for key, value in env.items()
            if _NAME.fullmatch(key)
        )
        path = f"{self.root}/job.sh"
        try:
            await self._write(path, (exports + script).encode(), 0o600)
        except (OSError, asyncssh.SFTPError) as exc:
            raise DriverError(f"cannot write the job script: {describe(exc)}") from None
        # The shell sshd starts leads the job's process group; its pid is kept while the job
        # runs, for stop() and destroy(), and removed once all of it has ended.
        command = (
            f"echo $$ >{shlex.quote(self.root + '/job.pid')}"
            f" && cd {shlex.quote(self.workspace)} && exec /bin/sh {shlex.quote(path)}"
        )
        assert self.conn is not None
        session = _Session()
        try:
            self.channel, _ = await self.conn.create_session(
                lambda: session, command, encoding=None
            )
        except (OSError, asyncssh.Error) as exc:
            raise DriverError(f"cannot start the job: {describe(exc)}") from None
        if self.stopped:  # stop() came while the job was being started
            await self._signal(signal.SIGKILL)
        return session

    @staticmethod
    async def _pump(session: _Session, out: OutputSink) -> None:
        while (chunk := await session.output.get()) is not None:
            await out(chunk)
        if session.lost is not None:
            raise DriverError(f"connection to the host lost: {describe(session.lost)}")

    async def _signal(self, sig: int) -> None:
        """Send `sig` to the running job's process group (its shell, if not a leader)."""
        if self.conn is None or not self.root:
            return
        pid_file = shlex.quote(self.root + "/job.pid")
        command = (
            f'pid=$(cat {pid_file} 2>/dev/null) && [ -n "$pid" ]'
            f" && {{ kill -{sig} -- -$pid 2>/dev/null || kill -{sig} $pid 2>/dev/null; }}"
        )
        with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
            await asyncio.wait_for(self.conn.run(command), GRACE)

    async def collect(self, source: str, destination: Path, max_size: int) -> None:
        sftp = self._require_sftp()
        path = self._path(source)
        try:
            attrs = await sftp.stat(path)  # a symbolic link is followed
            if attrs.type == FILE_DIRECTORY:
                raise DriverError(f"{source}: is a directory")
            if attrs.type != FILE_REGULAR:
                raise DriverError(f"{source}: not a regular file")
            if max_size and (attrs.size or 0) > max_size:
                raise DriverError(f"{source} exceeds the maximum artifact size of {max_size} bytes")
            await self._download(path, source, destination, max_size)
        except asyncssh.SFTPNoSuchFile:
            raise DriverError(f"{source}: no such file") from None
        except (OSError, asyncssh.SFTPError) as exc:
            raise DriverError(f"{source}: {describe(exc)}") from None

    async def _download(self, path: str, source: str, destination: Path, max_size: int) -> None:
        """Copy in chunks, stopping past `max_size` (a file may grow after its stat)."""
        sftp = self._require_sftp()
        size = 0
        async with sftp.open(path, "rb") as remote:
            with destination.open("wb") as local:
                while chunk := await remote.read(READ_SIZE):
                    assert isinstance(chunk, bytes)  # opened in binary mode
                    size += len(chunk)
                    if max_size and size > max_size:
                        raise DriverError(
                            f"{source} exceeds the maximum artifact size of {max_size} bytes"
                        )
                    await asyncio.to_thread(local.write, chunk)

    async def archive(self, paths: list[str], destination: Path, max_size: int) -> list[str]:
        """The cache's tar, made by the host's `tar` (docs/manifest.md §10)."""
        cap = f" | head -c {max_size + 1}" if max_size else ""
        command = (
            f"cd {shlex.quote(self.workspace)} || exit 1; set --; "
            f"for p in {' '.join(shlex.quote(p) for p in paths)}; do "
            'if [ -e "$p" ] || [ -L "$p" ]; then set -- "$@" "$p"; '
            f'else echo "{_MISSING}$p" >&2; fi; done; '
            f'[ $# -eq 0 ] || {{ tar -cf - -- "$@" || echo {_FAILED} >&2; }}{cap}'
        )
        with destination.open("wb") as file:
            errors = await self._piped(command, stdout=file)
        # Past max_size `head` stops reading, so tar fails too: the size is checked first.
        if max_size and await asyncio.to_thread(os.path.getsize, destination) > max_size:
            raise TooLarge(f"larger than {max_size} bytes")
        missing = [line.removeprefix(_MISSING) for line in errors if line.startswith(_MISSING)]
        if _FAILED in errors:
            problems = [
                line for line in errors if line != _FAILED and not line.startswith(_MISSING)
            ]
            raise DriverError(f"cannot archive the cache: {'; '.join(problems[-3:])}")
        return missing

    async def extract(self, archive: Path) -> None:
        """Unpack the cache with the host's `tar`, which refuses members leaving the workspace."""
        command = f"cd {shlex.quote(self.workspace)} && tar -xf - || echo {_FAILED} >&2"
        with archive.open("rb") as file:
            errors = await self._piped(command, stdin=file)
        if _FAILED in errors:
            problems = [line for line in errors if line != _FAILED]
            raise DriverError(f"cannot unpack the cache: {'; '.join(problems[-3:])}")

    async def _piped(self, command: str, **redirects: Any) -> list[str]:
        """Run `command` with stdin or stdout redirected to a local file; its stderr lines."""
        assert self.conn is not None
        try:
            done = await self.conn.run(command, encoding=None, **redirects)
        except (OSError, asyncssh.Error) as exc:
            raise DriverError(f"connection to the host lost: {describe(exc)}") from None
        stderr = done.stderr if isinstance(done.stderr, bytes) else b""
        return stderr.decode(errors="replace").splitlines()

    async def stop(self) -> None:
        """SIGTERM to the job's process group, SIGKILL after GRACE seconds; later runs don't
        start. Concurrent calls share one stop."""
        self.stopped = True
        if self.stopping is None:
            self.stopping = asyncio.create_task(self._stop())
        await asyncio.shield(self.stopping)

    async def _stop(self) -> None:
        channel = self.channel
        if channel is None:
            return
        await self._signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.wait_closed(), GRACE)
            return
        await self._signal(signal.SIGKILL)
        channel.close()

    async def destroy(self) -> None:
        """Kill what still runs, remove the attempt's directory, undo the files written outside
        it, close the connection. Never raises."""
        self.stopped = True
        if self.conn is None:
            return
        if self.fixed:  # a throwaway host: its owner discards it
            await self._close()
            return
        try:
            if self.sftp is not None:
                await self._undo()
        except Exception as exc:
            log.warning("%s: undoing files on %s failed: %s", self.name, self.target.address, exc)
        try:
            # By name, not self.root: a create() cancelled after mktemp has no root yet.
            await self._shell(f"{_CLEAR} {shlex.quote(f'/tmp/{self.name}-')}")
        except Exception as exc:
            log.warning("%s: cleaning up on %s failed: %s", self.name, self.target.address, exc)
        finally:
            await self._close()

    async def _close(self) -> None:
        assert self.conn is not None
        if self.sftp is not None:
            self.sftp.exit()
        self.conn.close()
        with contextlib.suppress(Exception):
            await self.conn.wait_closed()
        self.conn = self.sftp = None

    async def _undo(self) -> None:
        sftp = self._require_sftp()
        for path, (data, mode) in self.replaced.items():
            async with sftp.open(path, "wb") as file:
                await file.write(data)
            await sftp.chmod(path, mode)
        for path in reversed(self.created):  # files before the directories they are in
            with contextlib.suppress(asyncssh.SFTPError):
                if await sftp.isdir(path):
                    await sftp.rmdir(path)  # only if empty: something else put a file there
                else:
                    await sftp.remove(path)
        self.replaced.clear()
        self.created.clear()

    def _require_sftp(self) -> asyncssh.SFTPClient:
        if self.sftp is None:
            raise DriverError("the ssh driver is not connected")
        return self.sftp


class _Session(asyncssh.SSHClientSession[bytes]):
    """A job's channel: output chunks (stdout and stderr, in arrival order) into a queue that
    ends with None, and how the shell ended."""

    def __init__(self) -> None:
        self.output: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.exited = asyncio.Event()
        self.status: int | None = None
        self.signal = ""
        self.lost: Exception | None = None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.output.put_nowait(data)

    def exit_status_received(self, status: int) -> None:
        self.status = status
        self.exited.set()

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.signal = signal
        self.exited.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc
        self.exited.set()
        self.output.put_nowait(None)

    def ending(self) -> Exit:
        if self.signal:
            number = getattr(signal.Signals, f"SIG{self.signal}", None)
            if number is not None:
                return Exit(128 + number, signalled(number))
            return Exit(None, f"terminated by signal {self.signal}")
        if self.status is None:
            return Exit(None, "the host closed the job's channel without an exit status")
        return exited(self.status)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The jobs of the attempts whose directories start with $1 killed (their process groups), and
# their directories removed: earlier attempts' at create(), the attempt's own at destroy().
_CLEAR = (
    'clear() { for dir in "$1"*; do [ -d "$dir" ] || continue;'
    ' pid=$(cat "$dir/job.pid" 2>/dev/null) && kill -9 -- -"$pid" 2>/dev/null;'
    ' rm -rf -- "$dir"; done; }; clear'
)


async def connect(
    target: Target, host: str, port: int, **options: float
) -> asyncssh.SSHClientConnection:
    """A connection to the host as `target.user` with `target.key`, its host key verified."""
    return await asyncssh.connect(
        host,
        port,
        username=target.user,
        client_keys=[target.key],
        known_hosts=target.known_hosts,  # never None: an unknown host is refused
        config=None,  # the runner's own ~/.ssh/config has no say
        agent_path=None,
        preferred_auth="publickey",
        keepalive_interval=KEEPALIVE,
        keepalive_count_max=KEEPALIVE_MISSED,
        **options,
    )


def _joined(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(exc: BaseException) -> str:
    """asyncssh's reason, an OSError's strerror, or the exception's text or class name."""
    if isinstance(exc, asyncssh.Error | asyncssh.SFTPError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's says "Connect call failed (address)"
    return str(exc) or type(exc).__name__


async def _finished(task: asyncio.Task[None], seconds: float) -> bool:
    done, _ = await asyncio.wait((task,), timeout=seconds)
    return bool(done)
