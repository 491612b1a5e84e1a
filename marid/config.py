"""Configuration: one YAML file (docs/configuration.md §1) loaded into frozen dataclasses.

`load()` rejects unknown keys, wrong types and missing required keys with a ConfigError
whose message names the key; the command line prints it as one line and exits 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml


class ConfigError(Exception):
    """A configuration problem; str() is one line naming the key."""


class Size:
    """Marks an int field given as `<int>` bytes or `<int>k|m|g` (1024-based)."""


class Duration:
    """Marks a float field (seconds) given as one or more `<int>h|m|s` groups."""


class Url:
    """Marks a str field holding an absolute http(s) URL; a trailing `/` is dropped."""


def required() -> Any:
    """A field the file must give (unless the caller marks it optional)."""
    return dataclasses.field(default=None, metadata={"required": True})


_SIZE = re.compile(r"(\d+)([kmg]?)", re.IGNORECASE)
_DURATION = re.compile(r"(?:\d+[hms])+")


def parse_size(text: str) -> int:
    """Bytes for a size such as `512m`; raises ValueError."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(text)
    unit = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return int(match.group(1)) * unit


def parse_duration(text: str) -> float:
    """Seconds for a duration such as `1h30m`; raises ValueError."""
    text = text.strip()
    if not _DURATION.fullmatch(text):
        raise ValueError(text)
    unit = {"h": 3600, "m": 60, "s": 1}
    return float(sum(int(n) * unit[u] for n, u in re.findall(r"(\d+)([hms])", text)))


@dataclass(frozen=True)
class ServerConfig:
    url: Annotated[str, Url] = required()
    api_url: Annotated[str, Url] = ""  # default: url + "/api"
    debug: bool = False
    listen: str = "127.0.0.1:8080"
    # Slow clients (docs/configuration.md §1): the longest a request's head may take to
    # arrive, and the longest wait for the next bytes of its body.
    header_timeout: Annotated[float, Duration] = 30.0
    body_timeout: Annotated[float, Duration] = 60.0
    # Usernames of the administrators: they manage runners and runner tokens (docs/api.md §28)
    # with a token holding the `runner` scope.
    admins: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DatabaseConfig:
    dsn: str = required()
    pool_size: int = 10


@dataclass(frozen=True)
class CryptoConfig:
    key: str = required()


@dataclass(frozen=True)
class SizeLimit:
    max_size: Annotated[int, Size] = 0


@dataclass(frozen=True)
class ArtifactsConfig:
    max_size: Annotated[int, Size] = 50 * 1024**2
    cleanup_threshold: Annotated[int, Size] = 1024**3


@dataclass(frozen=True)
class CachesConfig:
    """Build caches (docs/manifest.md §10): the largest entry a build saves, and the total kept
    per namespace (or per owner, for builds without one) before the least recently used go."""

    max_size: Annotated[int, Size] = 512 * 1024**2
    max_total: Annotated[int, Size] = 2 * 1024**3


@dataclass(frozen=True)
class BuildsConfig:
    timeout: Annotated[float, Duration] = 30 * 60.0
    max_timeout: Annotated[float, Duration] = 2 * 3600.0
    # Bytes kept of each job's output: past it, its head and tail with a line saying how
    # much was dropped between them (docs/configuration.md §1, docs/architecture.md §6.1).
    max_output: Annotated[int, Size] = 64 * 1024**2
    # How many builds of one author may run at once, on all runners together (docs/api.md
    # §7.1 Pending); None: no limit. Read by runners when they claim and by the API for the
    # pending reasons, so every process should have the same value.
    max_running_per_user: int | None = None
    # How long a runner keeps the workspace of a build that ended failed, killed or timed_out,
    # for resuming it from a job (docs/api.md §27); 0: none is kept.
    keep_workspace: Annotated[float, Duration] = 3600.0


@dataclass(frozen=True)
class Limits:
    memory: Annotated[int, Size] = 2 * 1024**3
    cpus: float = 1.0
    pids: int = 1024


@dataclass(frozen=True)
class LimitsConfig:
    default: Limits = field(default_factory=Limits)
    max: Limits = field(default_factory=lambda: Limits(memory=4 * 1024**3, cpus=2.0, pids=4096))


class PullPolicy:
    """Marks docker.pull: one of PULL_POLICIES (docs/configuration.md)."""


PULL_POLICIES = ("never", "if-not-present", "always")
# What docker.pull's booleans meant before it was a policy: true pulled the images the engine
# lacked, false pulled nothing. A file written then keeps its behaviour.
PULL_BOOLEANS = {True: "if-not-present", False: "never"}


# Capabilities job containers lose from the engine's default set (docs/configuration.md §1.4):
# raw sockets, device nodes, chroot, audit writes and passing file capabilities on.
DEFAULT_CAP_DROP = ["NET_RAW", "MKNOD", "SYS_CHROOT", "AUDIT_WRITE", "SETFCAP", "SETPCAP"]


MAX_PREPARE_AHEAD = 8  # each held container keeps a shell and an init process alive


@dataclass(frozen=True)
class DockerConfig:
    host: str = "unix:///var/run/docker.sock"
    pull: Annotated[str, PullPolicy] = "if-not-present"
    # Job containers' network: "build" (a bridge network of the build's own, made for each
    # attempt), the name of an engine network, "none", or None (the engine's default network).
    network: str | None = "build"
    # An OCI runtime the engine knows (e.g. runsc); None = crun if it has it, else its default
    runtime: str | None = None
    cap_drop: list[str] = field(default_factory=lambda: list(DEFAULT_CAP_DROP))
    # Job containers made and started (held) ahead of their turn, while the job before runs.
    prepare_ahead: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.prepare_ahead <= MAX_PREPARE_AHEAD:
            raise ConfigError(f"docker.prepare_ahead: must be from 0 to {MAX_PREPARE_AHEAD}")


@dataclass(frozen=True)
class RunnerConfig:
    name: str = ""  # "" = <hostname>-<pid>
    parallelism: int = 2
    lease: Annotated[float, Duration] = 30.0
    # A build's attempts, the first included: an attempt that fails outside the user's commands
    # or loses its lease is retried until then (docs/manifest.md §6.13).
    max_attempts: int = 3
    retry_delay: Annotated[float, Duration] = 10.0  # before the 2nd attempt; doubled each time
    # What a runner on another machine says of itself (docs/runners.md): listed by GET /runners.
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("runner.max_attempts: must be at least 1")


@dataclass(frozen=True)
class CronConfig:
    interval: Annotated[float, Duration] = 60.0


@dataclass(frozen=True)
class WebhooksConfig:
    allow_loopback: bool = False
    attempts: int = 6  # per event, the first included
    retry_delay: Annotated[float, Duration] = 30.0  # before the 2nd attempt; x4 each time
    concurrency: int = 16  # deliveries one scheduler sends at once


@dataclass(frozen=True)
class OutboundConfig:
    """What marid's own requests (image downloads, webhooks) may reach besides the public
    internet: IP networks or host names (docs/configuration.md §1.3)."""

    allow: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RateLimitConfig:
    enabled: bool = True
    window: Annotated[float, Duration] = 60.0
    authenticated: int = 600
    anonymous: int = 60
    failed_logins: int = 10  # wrong passwords per window for each user and each address
    trusted_proxies: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MetricsConfig:
    token: str | None = None


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"


@dataclass(frozen=True)
class S3Config:
    bucket: str = ""  # required when storage.backend is s3 (checked in _finish)
    prefix: str = ""
    endpoint_url: Annotated[str | None, Url] = None  # None: AWS itself
    region: str = "us-east-1"
    access_key_id: str | None = None  # None: boto3's default credential chain
    secret_access_key: str | None = None
    # Hand runners on other machines presigned URLs to download objects, images and caches
    # from the bucket themselves (docs/runners.md §6); they must reach endpoint_url.
    presign: bool = True


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "fs"
    path: str = ".marid/blobs"
    s3: S3Config = field(default_factory=S3Config)


@dataclass(frozen=True)
class ReaperConfig:
    """What the reapers of the API and the runners leave alone (docs/configuration.md §1.3)."""

    interval: Annotated[float, Duration] = 10 * 60.0  # between sweeps; one runs at start
    grace: Annotated[float, Duration] = 3600.0  # minimum age of anything removed


@dataclass(frozen=True)
class OsDriverConfig:
    """Who may submit `driver: os` builds, which run as local processes on a runner's host
    with no isolation (docs/configuration.md §1.3, issue 11)."""

    # None only in a Config built in code; a loaded file that lists `os` in `drivers` without
    # this key gets [] (nobody), so enabling `os` never opens it to every user by accident.
    users: list[str] | None = None


@dataclass(frozen=True)
class SshDriverConfig:
    """How a runner reaches the hosts of `driver: ssh` builds (docs/configuration.md §1.3): the
    private key it logs in with and the known_hosts file every host key is checked against. A
    runner offers `ssh` only when both are set (runner/worker.py)."""

    key: str | None = None  # path of the runner's private key (OpenSSH or PEM, no passphrase)
    known_hosts: str | None = None  # path of an OpenSSH known_hosts file; never skipped
    user: str = "root"
    connect_timeout: Annotated[float, Duration] = 30.0

    @property
    def configured(self) -> bool:
        return self.key is not None and self.known_hosts is not None


@dataclass(frozen=True)
class QemuDriverConfig:
    """How a runner boots the virtual machines of `driver: qemu` builds (docs/configuration.md
    §1.3). A runner offers `qemu` only when `binary` and qemu-img are installed."""

    binary: str = "qemu-system-x86_64"
    # Directory of base images: `image: debian/stable` is images/debian/stable.qcow2.
    images: str | None = None
    work_dir: str = ".marid/qemu"  # uploaded images fetched, each attempt's disk overlay and keys
    accel: str = "auto"  # kvm, tcg, or auto: kvm where /dev/kvm is hardware KVM, else tcg
    boot_timeout: Annotated[float, Duration] = 120.0  # from qemu's start to an SSH login
    # "none": the guest reaches nothing (only the runner's forwarded SSH port reaches it);
    # "user": qemu's user-mode NAT, through which the guest reaches what the runner's host
    # reaches, its loopback services included (10.0.2.2).
    network: str = "none"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    drivers: list[str] = field(default_factory=lambda: ["docker"])
    os_driver: OsDriverConfig = field(default_factory=OsDriverConfig)
    ssh_driver: SshDriverConfig = field(default_factory=SshDriverConfig)
    qemu_driver: QemuDriverConfig = field(default_factory=QemuDriverConfig)
    objects: SizeLimit = field(default_factory=lambda: SizeLimit(max_size=5 * 1024**2))
    images: SizeLimit = field(default_factory=lambda: SizeLimit(max_size=10 * 1024**3))
    artifacts: ArtifactsConfig = field(default_factory=ArtifactsConfig)
    caches: CachesConfig = field(default_factory=CachesConfig)
    builds: BuildsConfig = field(default_factory=BuildsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    docker: DockerConfig = field(default_factory=DockerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    cron: CronConfig = field(default_factory=CronConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    reaper: ReaperConfig = field(default_factory=ReaperConfig)

    def is_admin(self, username: str) -> bool:
        """Whether `username` administers runners and runner tokens (`server.admins`)."""
        return username in self.server.admins

    def drivers_for(self, username: str) -> list[str]:
        """The driver types `username` may submit: `drivers`, without `os` unless they are
        listed in `os_driver.users` (docs/manifest.md §4 rule 17)."""
        users = self.os_driver.users
        if users is None or username in users:
            return self.drivers
        return [driver for driver in self.drivers if driver != "os"]


LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_OUTPUT = 64 * 1024  # builds.max_output: room for a head, a tail and the line between
DRIVERS = ("docker", "qemu", "ssh", "os")
STORAGE_BACKENDS = ("fs", "s3")


def locate(path: str | None) -> Path:
    """The config file to use: `--config`, else $MARID_CONFIG, else ./marid.yml."""
    return Path(path or os.environ.get("MARID_CONFIG") or "marid.yml")


def load(path: Path, optional: tuple[str, ...] = ()) -> Config:
    """Read and check the YAML file at `path`; raises ConfigError.

    Keys named in `optional` (dotted) may be missing: `marid up` fills them itself.
    A missing file is an error unless `optional` covers every required key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if not optional:
            raise ConfigError(
                f"{path}: file not found (give --config or set MARID_CONFIG)"
            ) from None
        text = ""
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    return from_dict(data if data is not None else {}, optional, source=str(path))


def from_dict(data: Any, optional: tuple[str, ...] = (), source: str = "config") -> Config:
    """Build a Config from already-parsed YAML; raises ConfigError."""
    try:
        config = _build(Config, data, "", set(optional))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return _finish(config, source)


def _finish(config: Config, source: str) -> Config:
    server = config.server
    if server.url and not server.api_url:
        server = dataclasses.replace(server, api_url=server.url + "/api")
        config = dataclasses.replace(config, server=server)
    for driver in config.drivers:
        if driver not in DRIVERS:
            raise ConfigError(
                f"{source}: drivers: unknown driver {driver!r} ({', '.join(DRIVERS)})"
            )
    if "os" in config.drivers and config.os_driver.users is None:
        config = dataclasses.replace(config, os_driver=OsDriverConfig(users=[]))
    _check_ssh_driver(config.ssh_driver, source)
    _check_qemu_driver(config.qemu_driver, source)
    if config.logging.level not in LOG_LEVELS:
        raise ConfigError(f"{source}: logging.level: must be one of {', '.join(LOG_LEVELS)}")
    if config.crypto.key and len(config.crypto.key) < 32:
        raise ConfigError(f"{source}: crypto.key: must be at least 32 characters")
    _check_storage(config.storage, source)
    if config.builds.max_output < MIN_OUTPUT:
        raise ConfigError(f"{source}: builds.max_output: must be at least 64k")
    if config.builds.max_running_per_user == 0:
        raise ConfigError(f"{source}: builds.max_running_per_user: must be at least 1 (or null)")
    for key in ("header_timeout", "body_timeout"):
        if getattr(config.server, key) <= 0:
            raise ConfigError(f"{source}: server.{key}: must be longer than 0s")
    if config.reaper.interval <= 0:
        raise ConfigError(f"{source}: reaper.interval: must be longer than 0s")
    limits = config.rate_limit
    if limits.window <= 0:
        raise ConfigError(f"{source}: rate_limit.window: must be longer than 0s")
    if limits.failed_logins < 1:
        raise ConfigError(f"{source}: rate_limit.failed_logins: must be at least 1")
    for entry in limits.trusted_proxies:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(
                f"{source}: rate_limit.trusted_proxies: {entry!r} is no IP address or network"
            ) from None
    for entry in config.outbound.allow:
        if not _network_or_host(entry):
            raise ConfigError(
                f"{source}: outbound.allow: {entry!r} is no IP address, network or host name"
            )
    hooks = config.webhooks
    if hooks.attempts < 1 or hooks.concurrency < 1:
        key = "attempts" if hooks.attempts < 1 else "concurrency"
        raise ConfigError(f"{source}: webhooks.{key}: must be at least 1")
    return config


_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?", re.IGNORECASE)


def _network_or_host(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
        return True
    except ValueError:
        return bool(_HOST_NAME.fullmatch(entry)) and not entry.replace(".", "").isdigit()


def _check_ssh_driver(ssh: SshDriverConfig, source: str) -> None:
    if (ssh.key is None) != (ssh.known_hosts is None):
        missing, given = (
            ("known_hosts", "key") if ssh.known_hosts is None else ("key", "known_hosts")
        )
        raise ConfigError(
            f"{source}: ssh_driver.{missing}: required with ssh_driver.{given}"
            " (a runner logs in with the key and checks every host key against known_hosts)"
        )
    for name in ("key", "known_hosts", "user"):
        if getattr(ssh, name) == "":
            raise ConfigError(f"{source}: ssh_driver.{name}: must not be empty")
    if ssh.connect_timeout <= 0:
        raise ConfigError(f"{source}: ssh_driver.connect_timeout: must be longer than 0s")


QEMU_ACCELS = ("auto", "kvm", "tcg")
QEMU_NETWORKS = ("none", "user")


def _check_qemu_driver(qemu: QemuDriverConfig, source: str) -> None:
    if qemu.accel not in QEMU_ACCELS:
        raise ConfigError(f"{source}: qemu_driver.accel: must be one of {', '.join(QEMU_ACCELS)}")
    if qemu.network not in QEMU_NETWORKS:
        raise ConfigError(
            f"{source}: qemu_driver.network: must be one of {', '.join(QEMU_NETWORKS)}"
        )
    for name in ("binary", "images", "work_dir"):
        if getattr(qemu, name) == "":
            raise ConfigError(f"{source}: qemu_driver.{name}: must not be empty")
    if qemu.boot_timeout <= 0:
        raise ConfigError(f"{source}: qemu_driver.boot_timeout: must be longer than 0s")


def _check_storage(storage: StorageConfig, source: str) -> None:
    if storage.backend not in STORAGE_BACKENDS:
        raise ConfigError(
            f"{source}: storage.backend: must be one of {', '.join(STORAGE_BACKENDS)}, "
            f"not {storage.backend!r}"
        )
    if storage.backend == "fs" and not storage.path:
        raise ConfigError(f"{source}: storage.path: required when storage.backend is fs")
    s3 = storage.s3
    if storage.backend == "s3" and not s3.bucket:
        raise ConfigError(f"{source}: storage.s3.bucket: required when storage.backend is s3")
    if (s3.access_key_id is None) != (s3.secret_access_key is None):
        raise ConfigError(
            f"{source}: storage.s3.access_key_id and storage.s3.secret_access_key: "
            "give both or neither"
        )


def _build(cls: type, data: Any, prefix: str, optional: set[str], base: Any = None) -> Any:
    """Instantiate dataclass `cls` from `data`, on top of `base` (the field's default)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'top level'}: must be a mapping")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key")
    values: dict[str, Any] = {}
    for name, fld in names.items():
        key = prefix + name
        default = getattr(base, name) if base is not None else _default(fld)
        if dataclasses.is_dataclass(hints[name]):
            # Absent sections are built from {} so their required keys are still checked.
            section = data.get(name) if data.get(name) is not None else {}
            values[name] = _build(hints[name], section, key + ".", optional, default)
        elif name not in data or data[name] is None:
            if fld.metadata.get("required") and key not in optional:
                raise ConfigError(f"{key}: required key is missing")
            values[name] = default
        else:
            values[name] = _convert(hints[name], data[name], key)
    return cls(**values)


def _default(fld: dataclasses.Field[Any]) -> Any:
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory()
    return fld.default


def _convert(hint: Any, value: Any, key: str) -> Any:
    marker = None
    if typing.get_origin(hint) is Annotated:
        hint, marker = typing.get_args(hint)[0], typing.get_args(hint)[1]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if marker is Size:
        return _parsed(parse_size, value, key, "a size such as 512m or 2g")
    if marker is Duration:
        return _parsed(parse_duration, value, key, "a duration such as 90s or 1h30m")
    if marker is Url:
        return _url(value, key)
    if marker is PullPolicy:
        return _pull_policy(value, key)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of strings")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key}: must be a non-negative integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{key}: must be a positive number")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string")
    return value


def _parsed(parse: typing.Callable[[str], Any], value: Any, key: str, kind: str) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # a bare number of bytes (or seconds, for durations)
        if parse is parse_duration:
            value += "s"
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be {kind}")
    try:
        return parse(value)
    except ValueError:
        raise ConfigError(f"{key}: must be {kind}, not {value!r}") from None


def _pull_policy(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return PULL_BOOLEANS[value]
    if not isinstance(value, str) or value not in PULL_POLICIES:
        raise ConfigError(f"{key}: must be one of {', '.join(PULL_POLICIES)}, not {value!r}")
    return value


def _url(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key}: must be an absolute http or https URL, not {value!r}")
    return value.rstrip("/")
