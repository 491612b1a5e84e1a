"""The qemu test base image (scripts/qemu-test-image, groundwork for issue 12's qemu driver): it
boots as a disk, copy-on-write, with qemu's user-mode network restricted to the forwarded SSH
port on 127.0.0.1; takes the runner's authorized key and host key from fw_cfg (nothing is baked
into the image); answers SSH as root, the host key verified; and powers off. The guest reaches
nothing, not even the host.

The image comes from the script's cache; when it is missing (a new machine, or the script
changed) the first test builds it, about 90 s. `.ci/run` should build it before the suite.

KVM only where it is hardware KVM (kvm_intel or kvm_amd loaded): the /dev/kvm of these machines
is kvm-pvm, which runs only guest kernels built for PVM, and a stock Debian kernel hangs there
at its first protected-mode instruction, so here the guest runs under TCG. MARID_QEMU_ACCEL=kvm
or tcg overrides the choice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from marid.pgcluster import free_port

SSH_WAIT = 300.0  # seconds from qemu's start to an SSH login, as Djinn waits (TCG: about 25)
POWEROFF_WAIT = 120.0


def accelerator() -> str:
    """kvm where /dev/kvm is hardware KVM, else tcg (MARID_QEMU_ACCEL overrides)."""
    chosen = os.environ.get("MARID_QEMU_ACCEL")
    if chosen:
        return chosen
    hardware = any(Path("/sys/module", name).exists() for name in ("kvm_intel", "kvm_amd"))
    return "kvm" if hardware and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


@dataclass
class Guest:
    process: asyncio.subprocess.Process
    port: int
    client_key: asyncssh.SSHKey
    host_key: asyncssh.SSHKey
    serial_log: Path
    started: float

    def log_tail(self) -> str:
        text = self.serial_log.read_text(errors="replace") if self.serial_log.exists() else ""
        return text[-3000:]

    async def connect(self) -> asyncssh.SSHClientConnection:
        """Log in as root once sshd answers, verifying the host key given at boot."""
        deadline = self.started + SSH_WAIT
        trusted = [self.host_key.convert_to_public()]
        while True:
            if self.process.returncode is not None:
                pytest.fail(f"qemu exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                return await asyncssh.connect(
                    "127.0.0.1",
                    self.port,
                    username="root",
                    client_keys=[self.client_key],
                    known_hosts=(trusted, [], []),
                    connect_timeout=10,
                    login_timeout=10,
                )
            except (OSError, TimeoutError, asyncssh.Error) as exc:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"no SSH login within {SSH_WAIT:.0f}s ({exc!r}):\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.5)


def qemu_command(image: Path, port: int, directory: Path, accel: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", accel, "-m", "512", "-smp", "1",
        "-nodefaults", "-display", "none", "-serial", f"file:{directory / 'serial.log'}",
        "-drive", f"file={image},if=virtio,format=qcow2,snapshot=on",
        "-nic", f"user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-fw_cfg", f"name=opt/marid/authorized_keys,file={directory / 'authorized_keys'}",
        "-fw_cfg", f"name=opt/marid/ssh_host_ed25519_key,file={directory / 'host_key'}",
    ]  # fmt: skip


@contextlib.asynccontextmanager
async def booted(image: Path, directory: Path) -> AsyncIterator[Guest]:
    """A VM of `image` with a fresh client key and host key; killed on the way out if it has
    not powered off."""
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    (directory / "authorized_keys").write_bytes(client_key.export_public_key())
    key_file = directory / "host_key"
    key_file.touch(mode=0o600)
    key_file.write_bytes(host_key.export_private_key())
    port = free_port()
    started = time.monotonic()
    with (directory / "qemu.err").open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *qemu_command(image, port, directory, accelerator()),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        yield Guest(process, port, client_key, host_key, directory / "serial.log", started)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_boots_answers_ssh_as_root_and_powers_off(qemu_image: Path, tmp_path: Path) -> None:
    before = qemu_image.stat()
    reached: list[bool] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reached.append(True)
        writer.close()

    # Listening on the host's loopback: a guest with user-mode networking unrestricted would
    # reach it as 10.0.2.2; restrict=on must drop that, as any other traffic leaving the guest.
    listener = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    listen_port = listener.sockets[0].getsockname()[1]
    async with listener, booted(qemu_image, tmp_path) as guest:
        conn = await guest.connect()
        async with conn:
            result = await conn.run("uname -a; id", check=True, timeout=60)
            boot_seconds = time.monotonic() - guest.started
            print(f"qemu test image: boot to SSH {boot_seconds:.1f}s ({accelerator()})")
            assert isinstance(result.stdout, str)
            assert result.stdout.startswith("Linux marid-test ")
            assert "uid=0(root) gid=0(root)" in result.stdout

            keys = await conn.run("cat /root/.ssh/authorized_keys", check=True, timeout=60)
            assert keys.stdout == guest.client_key.export_public_key().decode()
            locked = await conn.run("passwd -S root", check=True, timeout=60)
            assert isinstance(locked.stdout, str) and locked.stdout.split()[1] == "L"

            probe = await conn.run(
                f"timeout 5 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{listen_port}'"
                " && echo reached || echo blocked",
                timeout=60,
            )
            assert probe.stdout == "blocked\n" and not reached

            # sshd may be stopped before it reports the command's end.
            with contextlib.suppress(asyncssh.Error):
                await conn.run("systemctl poweroff", timeout=60)
        status = await asyncio.wait_for(guest.process.wait(), POWEROFF_WAIT)
        assert status == 0, guest.log_tail()
    after = qemu_image.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
