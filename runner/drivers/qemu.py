"""The qemu driver (docs/manifest.md §9.6): a build's jobs run as `root`, over SSH, in a virtual
machine booted for the attempt from the build's QCOW2 image.

create() resolves the image: a QCOW2 upload of the build's namespace (of its owner, for a build
without one), fetched once into the runner's work directory and checked there (a QCOW2 file
naming a backing file or an external data file would hand the guest a file of the runner's, so
it is refused), else a base image of the runner's `qemu_driver.images` directory. An overlay
takes every write, so the image is never changed. A fresh SSH client key and host key go to
the guest through qemu's -fw_cfg (scripts/qemu-test-image shows what an image does with them),
and qemu-system-x86_64 boots it with user-mode networking whose only way in is a port forwarded
on 127.0.0.1. Once the guest answers SSH with the host key it was given, the jobs run over that
connection as the ssh driver runs them, in /root: objects, keys, variables, output, artifacts,
kill and time limits behave alike.

destroy() powers the VM off (qemu is terminated: its disk is thrown away) and removes the
attempt's directory. qemu runs under `setpriv --pdeathsig KILL`: a runner that dies, even by
SIGKILL, takes its VMs with it, and a retried attempt removes what an earlier one left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from marid.config import QemuDriverConfig
from marid.runner.drivers.base import Driver, DriverError, Exit, Limits, OutputSink, SshKey
from marid.runner.drivers.ssh import SshDriver, Target, connect

log = logging.getLogger(__name__)
WORKSPACE = "/root"  # docs/manifest.md §2.2: the home directory of root
POWER_OFF_GRACE = 5.0  # seconds qemu has to exit on SIGTERM before SIGKILL
SYNC_TIMEOUT = 30.0  # seconds the guest has to flush its disk before its overlay is kept
PROBE_TIMEOUT = 10.0  # seconds one SSH login attempt may take while the guest boots
PROBE_PAUSE = 0.25  # seconds between login attempts
IMAGE_CHECK_TIMEOUT = 60.0  # seconds `qemu-img info` may take on an upload
CONSOLE_TAIL = 20  # lines of the guest's console shown when it does not boot
MIN_MEMORY_MIB = 128
PORT_TRIES = 3  # a forwarded port taken between choosing it and qemu binding it
_BASE_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass(frozen=True)
class Upload:
    """An uploaded QCOW2 image: its content's SHA-256 and how to copy it to a local file."""

    sha256: str
    fetch: Callable[[Path], Awaitable[None]]


# The upload of the build's namespace (or owner) named exactly so, or None.
FindUpload = Callable[[str], Awaitable[Upload | None]]


def qemu_place(config: QemuDriverConfig) -> str:
    """Where this runner's kept VM disks are, as runners announce it (docs/api.md §27)."""
    return f"qemu:{socket.gethostname()}:{Path(config.work_dir).absolute()}"


def kept_disks(config: QemuDriverConfig) -> Path:
    """The directory of the kept VM disks (`QemuDriver.keep`)."""
    return Path(config.work_dir).absolute() / "kept"


def accelerator(choice: str) -> str:
    """`kvm` or `tcg` for config qemu_driver.accel. `auto` takes kvm only where /dev/kvm is
    hardware KVM (kvm_intel or kvm_amd loaded) and usable: a /dev/kvm of another kind (such as
    kvm_pvm, which runs only kernels built for it) makes qemu abort or a stock kernel hang."""
    if choice != "auto":
        return choice
    hardware = any(Path("/sys/module", name).exists() for name in ("kvm_intel", "kvm_amd"))
    return "kvm" if hardware and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def missing_programs(config: QemuDriverConfig) -> list[str]:
    """The programs the driver needs that this host lacks (a runner offers qemu without none)."""
    needed = (config.binary, "qemu-img", "setpriv")
    return [program for program in needed if shutil.which(program) is None]


class QemuDriver(Driver):
    def __init__(
        self,
        config: QemuDriverConfig,
        image: str,
        limits: Limits,
        find_upload: FindUpload,
        name: str,
    ) -> None:
        self.config = config
        self.image = image
        self.limits = limits
        self.find_upload = find_upload
        self.name = name  # marid-<instance>-<build>-<attempt>: unique, names the directory
        self.work_dir = Path(config.work_dir).absolute()
        self.vm_dir = self.work_dir / "vms" / name
        self.process: asyncio.subprocess.Process | None = None
        self.guest: SshDriver | None = None
        self.booted_in = 0.0  # seconds from qemu's start to the first SSH login

    async def clear_previous(self) -> None:
        """Earlier attempts' VMs (their runner died) are killed and their directories removed."""
        prefix = self.name.rpartition("-")[0] + "-"  # marid-<instance>-<build>-: any attempt
        await asyncio.to_thread(clear, self.work_dir / "vms", prefix)

    async def create(self, out: OutputSink) -> None:
        base = await self._resolve(out)
        await asyncio.to_thread(self._prepare, base)
        client_key, host_key = self._keys()
        accel = accelerator(self.config.accel)
        memory, cpus = self._resources()
        await out(
            f"Booting {self.image} with {self.config.binary} ({accel}, {memory} MiB memory,"
            f" {cpus} CPU{'s' if cpus > 1 else ''})\n".encode()
        )
        started = time.monotonic()
        port = await self._boot(accel, memory, cpus)
        target = Target(
            f"127.0.0.1:{port}", "root", client_key, str(self.vm_dir / "known_hosts"), PROBE_TIMEOUT
        )
        (self.vm_dir / "known_hosts").write_text(
            f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}"
        )
        self.guest = SshDriver(target, self.name, workspace=WORKSPACE)
        self.guest.conn = await self._wait_for_ssh(target, port, started)
        self.booted_in = time.monotonic() - started
        await out(f"The VM answered SSH in {self.booted_in:.1f}s\n".encode())
        await self.guest.create(out)

    async def _resolve(self, out: OutputSink) -> Path:
        """The image's file: the upload named so, else the base image (docs/manifest.md §9.6)."""
        upload = await self.find_upload(self.image)
        if upload is not None:
            await out(f"Using uploaded image {self.image}\n".encode())
            return await self._fetched(upload)
        base = self._base_image()
        if base is None:
            raise DriverError(
                f"image {self.image}: no uploaded qemu image of this name and no such base image"
            )
        await out(f"Using base image {self.image}\n".encode())
        return base

    def _base_image(self) -> Path | None:
        """images/<name>.qcow2 (or images/<name>) when `name` is a plain relative path."""
        if self.config.images is None:
            return None
        parts = self.image.split("/")
        if not all(_BASE_NAME.fullmatch(part) and part not in (".", "..") for part in parts):
            return None
        directory = Path(self.config.images)
        for candidate in (directory.joinpath(*parts[:-1], parts[-1] + ".qcow2"),
                          directory.joinpath(*parts)):  # fmt: skip
            if candidate.is_file():
                return candidate
        return None

    async def _fetched(self, upload: Upload) -> Path:
        """The upload in the runner's cache (work_dir/images/<sha256>.qcow2), fetched and
        checked the first time it is used."""
        cache = self.work_dir / "images"
        path = cache / f"{upload.sha256}.qcow2"
        if path.is_file():
            return path
        await asyncio.to_thread(_private_directory, cache)
        partial = cache / f".{upload.sha256}.{os.getpid()}.{id(self)}.part"
        try:
            await upload.fetch(partial)
            digest = await asyncio.to_thread(_sha256, partial)
            if digest != upload.sha256:
                raise DriverError(f"image {self.image}: the stored upload is damaged")
            await check_image(partial, self.image)
            await asyncio.to_thread(partial.chmod, 0o444)
            await asyncio.to_thread(partial.rename, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        return path

    def _prepare(self, base: Path) -> None:
        """The attempt's directory, with the disk overlay on `base`; for a resumed build, a
        copy of the overlay its original kept (on the same base)."""
        _private_directory(self.vm_dir.parent)
        self.vm_dir.mkdir(mode=0o700)
        if self.start_from is not None:
            kept = Path(self.start_from)
            if not kept.is_file():
                raise DriverError(f"the kept workspace {kept} is gone")
            shutil.copyfile(kept, self.vm_dir / "disk.qcow2")
            return
        done = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
             "-b", str(base.absolute()), str(self.vm_dir / "disk.qcow2")],
            capture_output=True, text=True, timeout=IMAGE_CHECK_TIMEOUT, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise DriverError(f"image {self.image}: {_last_line(done.stderr)}")

    def _keys(self) -> tuple[asyncssh.SSHKey, asyncssh.SSHKey]:
        """A client key and a host key of this attempt's, written for -fw_cfg."""
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        (self.vm_dir / "authorized_keys").write_bytes(client_key.export_public_key())
        host_key_file = self.vm_dir / "host_key"
        host_key_file.touch(mode=0o600)
        host_key_file.write_bytes(host_key.export_private_key())
        return client_key, host_key

    def _resources(self) -> tuple[int, int]:
        """Memory in MiB and CPUs of the build's `resources` (docs/manifest.md §6.12)."""
        memory = max(self.limits.memory // 1024**2, MIN_MEMORY_MIB)
        return memory, max(math.ceil(self.limits.cpus), 1)

    def _command(self, accel: str, memory: int, cpus: int, port: int) -> list[str]:
        d = self.vm_dir
        restrict = "on" if self.config.network == "none" else "off"
        return [
            "setpriv", "--pdeathsig", "KILL", "--",
            self.config.binary, "-name", self.name, "-no-user-config", "-nodefaults",
            "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
            "-m", str(memory), "-smp", str(cpus), "-display", "none",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-serial", f"file:{d / 'console.log'}", "-pidfile", str(d / "qemu.pid"),
            "-drive", f"file={d / 'disk.qcow2'},if=virtio,format=qcow2,cache=unsafe",
            "-nic", f"user,model=virtio-net-pci,restrict={restrict},"
                    f"hostfwd=tcp:127.0.0.1:{port}-:22",
            "-fw_cfg", f"name=opt/marid/authorized_keys,file={d / 'authorized_keys'}",
            "-fw_cfg", f"name=opt/marid/ssh_host_ed25519_key,file={d / 'host_key'}",
        ]  # fmt: skip

    async def _boot(self, accel: str, memory: int, cpus: int) -> int:
        """Start qemu; the port forwarded to the guest's SSH. A port taken by someone else
        between choosing it and qemu binding it is chosen again."""
        for _ in range(PORT_TRIES):
            port = _free_port()
            with (self.vm_dir / "qemu.log").open("wb") as stderr:
                self.process = await asyncio.create_subprocess_exec(
                    *self._command(accel, memory, cpus, port),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 0.5)
            if self.process.returncode is None or "hostfwd" not in self._qemu_log():
                return port
        raise DriverError("the VM could not be started: no free port to forward to its SSH")

    async def _wait_for_ssh(
        self, target: Target, port: int, started: float
    ) -> asyncssh.SSHClientConnection:
        """Log in once the guest's sshd answers with the host key it was given."""
        deadline = started + self.config.boot_timeout
        assert self.process is not None
        while True:
            if self.process.returncode is not None:
                raise DriverError(
                    f"the VM stopped while booting (qemu exit status {self.process.returncode}):"
                    f" {_last_line(self._qemu_log()) or 'no message'}{self._console_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DriverError(
                    f"the VM did not answer SSH within {self.config.boot_timeout:g}s"
                    f"{self._console_tail()}"
                )
            wait = min(PROBE_TIMEOUT, remaining)
            try:
                return await connect(
                    target, "127.0.0.1", port, connect_timeout=wait, login_timeout=wait
                )
            except asyncssh.HostKeyNotVerifiable:
                raise DriverError("the VM answered SSH with a host key it was not given") from None
            except (OSError, TimeoutError, asyncssh.Error):
                await asyncio.sleep(PROBE_PAUSE)  # sshd not up yet: slirp resets the connection

    def _qemu_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.vm_dir / "qemu.log").read_text(errors="replace")
        return ""

    def _console_tail(self) -> str:
        """The end of the guest's console, for a boot that failed."""
        with contextlib.suppress(OSError):
            text = (self.vm_dir / "console.log").read_text(errors="replace")
            lines = text.replace("\r", "").rstrip("\n").splitlines()[-CONSOLE_TAIL:]
            if lines:
                return "; its console ended with:\n" + "\n".join(lines)
        return ""

    def _require_guest(self) -> SshDriver:
        if self.guest is None:
            raise DriverError("the VM is not running")
        return self.guest

    async def place_object(self, content: Path, destination: str) -> str:
        return await self._require_guest().place_object(content, destination)

    async def write_keys(self, keys: list[SshKey]) -> dict[str, str]:
        return await self._require_guest().write_keys(keys)

    async def run(self, job: str, script: str, env: dict[str, str], out: OutputSink) -> Exit:
        return await self._require_guest().run(job, script, env, out)

    async def collect(self, source: str, destination: Path, max_size: int) -> None:
        await self._require_guest().collect(source, destination, max_size)

    async def archive(self, paths: list[str], destination: Path, max_size: int) -> list[str]:
        return await self._require_guest().archive(paths, destination, max_size)

    async def extract(self, archive: Path) -> None:
        await self._require_guest().extract(archive)

    async def stop(self) -> None:
        """The job is signalled as on an ssh host; destroy() then powers the VM off."""
        if self.guest is not None:
            await self.guest.stop()

    async def keep(self) -> str | None:
        """Keep the VM's disk overlay, the build's workspace (docs/api.md §27): the guest
        flushes its file systems, the VM powers off, and the overlay moves to
        work_dir/kept/<name>.qcow2 (its path); the rest goes. A guest that cannot flush keeps
        nothing: a disk it may not have finished writing is no workspace to resume."""
        kept = kept_disks(self.config) / f"{self.name}.qcow2"
        try:
            if self.guest is None or self.guest.conn is None:
                raise DriverError("the VM never answered")
            async with asyncio.timeout(SYNC_TIMEOUT):
                await self.guest.sync()
            await self._power_off()
            await asyncio.to_thread(_private_directory, kept.parent)
            await asyncio.to_thread((self.vm_dir / "disk.qcow2").rename, kept)
        except (DriverError, OSError, TimeoutError) as exc:
            log.warning("%s: its disk is not kept: %s", self.name, exc)
            await self.destroy()
            return None
        await self.destroy()
        return str(kept)

    async def destroy(self) -> None:
        """Close the connection, power the VM off, remove the attempt's directory. Never
        raises."""
        await self._power_off()
        try:
            await asyncio.to_thread(shutil.rmtree, self.vm_dir, ignore_errors=False)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("%s: removing %s failed: %s", self.name, self.vm_dir, exc)

    async def _power_off(self) -> None:
        """Close the connection and end qemu (SIGTERM, SIGKILL after POWER_OFF_GRACE)."""
        if self.guest is not None:
            with contextlib.suppress(Exception):
                await self.guest.destroy()
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), POWER_OFF_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


async def check_image(path: Path, name: str) -> None:
    """Raise DriverError unless `path` is a QCOW2 image that names no other file (a backing
    file or an external data file would give the guest a file of the runner's)."""
    process = await asyncio.create_subprocess_exec(
        "qemu-img", "info", "--output=json", "-f", "qcow2", str(path),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), IMAGE_CHECK_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise DriverError(f"image {name}: not a QCOW2 image qemu can read") from None
    if process.returncode != 0:
        raise DriverError(f"image {name}: not a usable QCOW2 image ({_last_line(stderr.decode())})")
    info = json.loads(stdout)
    specific = info.get("format-specific", {}).get("data", {})
    if info.get("format") != "qcow2":
        raise DriverError(f"image {name}: not a QCOW2 image")
    if "backing-filename" in info or "full-backing-filename" in info:
        raise DriverError(f"image {name}: names a backing file, which is refused")
    if "data-file" in specific:
        raise DriverError(f"image {name}: names an external data file, which is refused")


def clear(vms: Path, prefix: str) -> None:
    """Kill the VMs of the directories of `vms` whose names start with `prefix`, and remove
    the directories."""
    if not vms.is_dir():
        return
    for directory in vms.iterdir():
        if directory.name.startswith(prefix):
            _kill_vm(directory)
            shutil.rmtree(directory, ignore_errors=True)


def _kill_vm(directory: Path) -> None:
    """SIGKILL the qemu of `directory` if it still runs (its pid file, checked against the
    process's command line: a pid may have been reused)."""
    try:
        pid = int((directory / "qemu.pid").read_text().strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if f"{directory}/".encode() in command:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _private_directory(path: Path) -> None:
    """Make `path` and the work directory above it, readable by the runner's user alone
    (uploaded images are their owners' and the keys are secrets)."""
    for directory in (path.parent, path):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
