"""Build manifests (docs/manifest.md, docs/manifest.md §9.1): parse, validate, plan a build.

Pure code, no I/O. Rule 15 (namespace usable) needs the database: the caller passes
`Manifest.namespace` to `namespaces.resolve(..., manifest=True)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from marid import caches, yamltext
from marid.config import Config, parse_duration, parse_size
from marid.validation import Errors, ValidationError

KEY = "manifest"
DRIVERS = ("docker", "qemu", "ssh", "os")
REQUIRED = {"docker": ("image", "workspace"), "qemu": ("image",), "ssh": ("address",)}
CREATE_DRIVER = "create-driver"
SCRIPT_HEADER = "#!/bin/sh\nexec 2>&1\nset -ex\n\n"
MIN_MEMORY = 6 * 1024**2
_NO_DRIVER = "Manifest invalid driver specified"
DURATION_HINT = "must be a duration such as 30m or 1h30m"
_CPUS = re.compile(r"\d+(?:\.\d{1,2})?")
_PIDS = re.compile(r"\d+")


class ManifestError(ValidationError):
    """An invalid manifest: {"manifest": [...]}, with what the caller needs for rule 15.

    Rule 15 (namespace usable) is checked by the caller against the database; its messages
    belong at `namespace_at` among the others (after rule 14, before rules 16-17).
    """

    def __init__(
        self,
        messages: list[str],
        namespace: str | None,
        namespace_at: int,
        others: dict[str, list[str]] | None = None,
    ) -> None:
        # `others`: marid's own manifest sections keyed by their field (`cache`, §10).
        super().__init__({**({KEY: messages} if messages else {}), **(others or {})})
        self.namespace = namespace  # None when absent, mistyped, or rule 1-2 stopped
        self.namespace_at = namespace_at

    def with_namespace(self, messages: list[str]) -> ValidationError:
        """This error with the rule-15 `messages` in their place."""
        own = self.errors.get(KEY, [])
        merged = own[: self.namespace_at] + messages + own[self.namespace_at :]
        others = {field: found for field, found in self.errors.items() if field != KEY}
        return ValidationError({**({KEY: merged} if merged else {}), **others})


@dataclass(frozen=True)
class ManifestLimits:
    """Defaults and caps of the EXT h.1 fields (seconds, bytes, cpus, pids)."""

    timeout: float
    max_timeout: float
    memory: int
    max_memory: int
    cpus: float
    max_cpus: float
    pids: int
    max_pids: int

    @classmethod
    def from_config(cls, config: Config) -> ManifestLimits:
        """The limits of `builds.*` and `limits.*` in `config`."""
        default, cap = config.limits.default, config.limits.max
        return cls(
            timeout=config.builds.timeout,
            max_timeout=config.builds.max_timeout,
            memory=default.memory,
            max_memory=cap.memory,
            cpus=default.cpus,
            max_cpus=cap.cpus,
            pids=default.pids,
            max_pids=cap.pids,
        )


DEFAULT_LIMITS = ManifestLimits.from_config(Config())


@dataclass(frozen=True)
class Driver:
    type: str
    config: dict[str, str]  # every key of `driver`, `type` included


@dataclass(frozen=True)
class Source:
    url: str
    ref: str | None  # None: the repository's default branch
    dir: str


@dataclass(frozen=True)
class Resources:
    memory: int  # bytes
    cpus: float
    pids: int


@dataclass(frozen=True)
class Job:
    stage: str  # "" when missing; such jobs are not part of the build
    name: str  # normalised (§5.3)
    commands: list[str]
    artifacts: list[tuple[str, str]]  # (source, name)
    timeout: float | None  # seconds


@dataclass(frozen=True)
class Manifest:
    text: str  # exactly as submitted
    namespace: str | None  # raw `path[@owner]`, checked by the caller (rule 15)
    driver: Driver
    env: list[tuple[str, str]]
    objects: list[tuple[str, str]]  # (source, destination)
    sources: list[Source]
    stages: list[str]  # deduplicated
    allow_failures: list[str]
    jobs: list[Job]  # every job of the manifest, in manifest order
    timeout: float  # seconds
    resources: Resources
    cache: caches.Cache | None = None  # marid's own (§10)


@dataclass(frozen=True)
class BuildJob:
    name: str
    commands: str  # one command per line
    artifacts: list[tuple[str, str]] = field(default_factory=list)
    timeout: float | None = None


@dataclass(frozen=True)
class BuildStage:
    name: str
    allow_failures: bool
    jobs: list[BuildJob]


@dataclass(frozen=True)
class BuildArtifact:
    name: str
    source: str
    job: str  # name of the first job declaring it


@dataclass(frozen=True)
class Plan:
    stages: list[BuildStage]
    artifacts: list[BuildArtifact]

    @property
    def jobs(self) -> list[BuildJob]:
        """Every job in execution order."""
        return [job for stage in self.stages for job in stage.jobs]


def parse(
    text: str, limits: ManifestLimits | None = None, drivers: list[str] | None = None
) -> Manifest:
    """The validated manifest; raises ManifestError, a ValidationError (docs/manifest.md §4).

    `limits` None: defaults of an empty config, no caps. `drivers` None: rule 17 is skipped.
    """
    data = _load(text)
    errors = Errors()
    raw = _read(data, errors)  # rule 3
    driver = _driver(raw, errors)  # rules 4-9
    env = _env(raw.env, errors)  # rule 10
    objects = _arrows(raw.objects, "objects", errors)  # rule 11
    sources = _sources(raw.sources, errors)  # rule 12
    artifacts = [_arrows(job.artifacts, f"jobs[{job.index}].artifacts", errors) for job in raw.jobs]
    stages = _unique(stage for stage in raw.stages if stage)
    names = _job_names(raw.jobs)
    _check_names(stages, len(sources), raw.jobs, names, errors)  # rule 14
    namespace_at = len(errors.by_field.get(KEY, []))  # rule 15: the caller's
    timeout, resources, job_timeouts = _limits(raw, limits, errors)  # rule 16
    _check_enabled(driver.type, drivers, errors)  # rule 17
    workspace = driver.config.get("workspace") if driver.type == "docker" else None
    cache = caches.parse(data.get("cache"), workspace, errors)  # marid's own: §10
    if cache is not None:
        caches.check_sources(cache, [source.dir for source in sources], errors)
    if errors.by_field:
        others = {name: found for name, found in errors.by_field.items() if name != KEY}
        raise ManifestError(errors.by_field.get(KEY, []), raw.namespace, namespace_at, others)
    jobs = [
        Job(job.stage or "", name, job.commands, arts, limit)
        for job, name, arts, limit in zip(raw.jobs, names, artifacts, job_timeouts, strict=True)
    ]
    allow = _unique(raw.allow_failures)
    return Manifest(
        text,
        raw.namespace,
        driver,
        env,
        objects,
        sources,
        stages,
        allow,
        jobs,
        timeout,
        resources,
        cache,
    )


def plan(manifest: Manifest, number: int) -> Plan:
    """The stages, jobs and artifact records of build `number` at submission (§5.1-§5.4)."""
    setup = [BuildJob(CREATE_DRIVER, "")]
    setup += [BuildJob(f"clone.{i}", clone_commands(s)) for i, s in enumerate(manifest.sources)]
    stages = [BuildStage(f"setup - #{number}", False, setup)]
    for name in manifest.stages:
        jobs = [
            BuildJob(job.name, "\n".join(job.commands), job.artifacts, job.timeout)
            for job in manifest.jobs
            if job.stage == name
        ]
        stages.append(BuildStage(name, name in manifest.allow_failures, jobs))
    artifacts: dict[str, BuildArtifact] = {}
    for stage in stages:
        for job in stage.jobs:
            for source, artifact in job.artifacts:
                artifacts.setdefault(artifact, BuildArtifact(artifact, source, job.name))
    return Plan(stages, list(artifacts.values()))


def script(commands: list[str]) -> str:
    """The shell script of a job (§6.2)."""
    return SCRIPT_HEADER + "".join(command + "\n" for command in commands)


def clone_commands(source: Source) -> str:
    """The commands of a `clone.<i>` job, one per line (§5.2)."""
    lines = [f"mkdir -p {source.dir}", f"git clone -q {source.url} {source.dir}"]
    if source.ref:
        lines += [f"cd {source.dir}", f"git checkout -q {source.ref}"]
    return "\n".join(lines)


def job_name(name: str) -> str:
    """`name` normalised as §5.3 (may be empty)."""
    name = re.sub(r"[^A-Za-z0-9.]", "-", name.strip())
    return re.sub(r"-+", "-", name).strip("-").lower()


def split_arrow(entry: str) -> tuple[str, str] | None:
    """(source, destination) of a `source [=> destination]` entry (§3); None if invalid."""
    source, arrow, destination = (part.strip() for part in entry.partition("=>"))
    if not arrow:
        destination = source.rstrip("/").rsplit("/", 1)[-1]
    if not source or not destination:
        return None
    return source, destination


def split_source(entry: str) -> Source | None:
    """The `url [ref] [=> dir]` entry of `sources` (§2.5); None if invalid."""
    url, _, rest = entry.partition(" ")
    ref, _, directory = rest.replace(" ", "").partition("=>")
    if not directory:
        directory = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    if not url or not directory:
        return None
    return Source(url, ref or None, directory)


def format_size(size: int) -> str:
    """`size` bytes in the largest exact unit of the config syntax: 4294967296 -> `4g`."""
    for unit, factor in (("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def format_duration(seconds: float) -> str:
    """`seconds` in the config syntax: 5400 -> `1h30m`."""
    rest, parts = int(seconds), []
    for unit, factor in (("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, factor)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


# -- Rules 1-2: YAML ------------------------------------------------------------------------


def _stop(message: str) -> NoReturn:
    raise ManifestError([message], None, 1)


def _load(text: str) -> dict[str, Any]:
    try:
        data = yamltext.load(text)
    except yamltext.LoadError as exc:
        _stop(f"Manifest {exc}")
    if not isinstance(data, dict):
        _stop("Manifest must be a YAML mapping")
    return data


# -- Rule 3: field types ----------------------------------------------------------------------


@dataclass
class _RawJob:
    index: int
    stage: str | None = None
    name: str | None = None
    commands: list[str] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    timeout: str | None = None


@dataclass
class _Raw:
    """The manifest's fields once their types are checked; a mistyped field reads as absent."""

    namespace: str | None = None
    driver: dict[str, str] | None = None
    env: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    allow_failures: list[str] = field(default_factory=list)
    jobs: list[_RawJob] = field(default_factory=list)
    timeout: str | None = None
    resources: dict[str, str] | None = None
    mistyped: set[str] = field(default_factory=set)


def _read(data: dict[str, Any], errors: Errors) -> _Raw:
    raw = _Raw()
    reader = _Reader(errors, raw.mistyped)
    raw.namespace = reader.string(data, "namespace")
    raw.driver = reader.mapping(data, "driver")
    raw.env = reader.strings(data, "env")
    raw.objects = reader.strings(data, "objects")
    raw.sources = reader.strings(data, "sources")
    raw.stages = reader.strings(data, "stages")
    raw.allow_failures = reader.strings(data, "allow_failures")
    raw.jobs = _read_jobs(data.get("jobs"), reader)
    raw.timeout = reader.string(data, "timeout")
    raw.resources = reader.mapping(data, "resources")
    return raw


def _read_jobs(value: Any, reader: _Reader) -> list[_RawJob]:
    if value is None:
        return []
    items = value if isinstance(value, list) else []
    if not isinstance(value, list) or any(not isinstance(i, dict | None) for i in items):
        reader.mistype("jobs", "a list of mappings")
    jobs = []
    for index, item in enumerate(items):
        if isinstance(item, dict | None):
            data, prefix = item or {}, f"jobs[{index}]."
            job = _RawJob(index, reader.string(data, "stage", prefix))
            job.name = reader.string(data, "name", prefix)
            job.commands = reader.strings(data, "commands", prefix)
            job.artifacts = reader.strings(data, "artifacts", prefix)
            job.timeout = reader.string(data, "timeout", prefix)
            jobs.append(job)
    return jobs


@dataclass
class _Reader:
    """Typed reads of one mapping's keys; null means absent, a list item null means ""."""

    errors: Errors
    mistyped: set[str]

    def mistype(self, label: str, kind: str) -> None:
        self.errors.add(KEY, f"Manifest {label} must be {kind}")
        self.mistyped.add(label)

    def string(self, data: dict[str, Any], key: str, prefix: str = "") -> str | None:
        value = data.get(key)
        if value is None or isinstance(value, str):
            return value
        self.mistype(prefix + key, "a string")
        return None

    def strings(self, data: dict[str, Any], key: str, prefix: str = "") -> list[str]:
        value = data.get(key)
        if value is None:
            return []
        if isinstance(value, list) and all(isinstance(item, str | None) for item in value):
            return [item or "" for item in value]
        self.mistype(prefix + key, "a list of strings")
        return []

    def mapping(self, data: dict[str, Any], key: str) -> dict[str, str] | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, dict) and all(isinstance(v, str | None) for v in value.values()):
            return {k: v for k, v in value.items() if v is not None}
        self.mistype(key, "a mapping of strings")
        return None


# -- Rules 4-14 -------------------------------------------------------------------------------


def _driver(raw: _Raw, errors: Errors) -> Driver:
    config = raw.driver or {}
    kind = config.get("type", "")
    if "driver" in raw.mistyped:
        return Driver(kind, config)
    if kind not in DRIVERS:
        errors.add(KEY, f"Manifest invalid driver specified {kind}" if kind else _NO_DRIVER)
    for key in REQUIRED.get(kind, ()):
        if not config.get(key):
            errors.add(KEY, f"Manifest driver {kind} requires {key}")
    workspace = config.get("workspace")
    if kind == "docker" and workspace and not workspace.startswith("/"):
        errors.add(KEY, "Manifest driver docker workspace must be an absolute path")
    return Driver(kind, config)


def _env(entries: list[str], errors: Errors) -> list[tuple[str, str]]:
    pairs = []
    for entry in entries:
        key, equals, value = entry.partition("=")
        if equals and key:
            pairs.append((key, value))
        else:
            errors.add(KEY, f'Manifest env entry "{entry}" must be in the form KEY=VALUE')
    return pairs


def _arrows(entries: list[str], label: str, errors: Errors) -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for entry in entries:
        pair = split_arrow(entry)
        if pair is None:
            errors.add(KEY, f'Manifest {label} entry "{entry}" is invalid')
            continue
        found.pop(pair[0], None)  # the later entry wins, in its own position
        found[pair[0]] = pair[1]
    return list(found.items())


def _sources(entries: list[str], errors: Errors) -> list[Source]:
    sources = []
    for entry in entries:
        source = split_source(entry)
        if source is None:
            errors.add(KEY, f'Manifest sources entry "{entry}" is invalid')
        else:
            sources.append(source)
    return sources


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _job_names(jobs: list[_RawJob]) -> list[str]:
    counts: dict[str, int] = {}
    names = []
    for job in jobs:
        stage = job.stage or ""
        counts[stage] = counts.get(stage, 0) + 1
        names.append(job_name(job.name or "") or job_name(f"{stage}.{counts[stage]}"))
    return names


def _check_names(
    stages: list[str], sources: int, jobs: list[_RawJob], names: list[str], errors: Errors
) -> None:
    order = [CREATE_DRIVER] + [f"clone.{i}" for i in range(sources)]
    for stage in stages:
        order += [name for job, name in zip(jobs, names, strict=True) if job.stage == stage]
    seen: set[str] = set()
    reported: set[str] = set()
    for name in order:
        if name in seen and name not in reported:
            errors.add(KEY, f"Manifest duplicate job name {name}")
            reported.add(name)
        seen.add(name)


# -- Rules 16-17 ------------------------------------------------------------------------------


def _limits(
    raw: _Raw, limits: ManifestLimits | None, errors: Errors
) -> tuple[float, Resources, list[float | None]]:
    timeout, shown = _build_timeout(raw.timeout, limits, errors)
    resources = _resources(raw.resources or {}, limits, errors)
    job_timeouts: list[float | None] = []
    for job in raw.jobs:
        seconds = _duration(job.timeout) if job.timeout is not None else None
        if job.timeout is not None and seconds is None:
            errors.add(KEY, f"Manifest jobs[{job.index}].timeout {DURATION_HINT}")
        elif seconds is not None and seconds > timeout:
            errors.add(
                KEY, f"Manifest jobs[{job.index}].timeout exceeds the build timeout of {shown}"
            )
        job_timeouts.append(seconds)
    return timeout, resources, job_timeouts


def _build_timeout(
    text: str | None, limits: ManifestLimits | None, errors: Errors
) -> tuple[float, str]:
    """The build limit in seconds and as shown in messages."""
    default = (limits or DEFAULT_LIMITS).timeout
    seconds = _duration(text) if text is not None else None
    if seconds is None:
        if text is not None:
            errors.add(KEY, f"Manifest timeout {DURATION_HINT}")
        return default, format_duration(default)
    if limits is not None and seconds > limits.max_timeout:
        shown = format_duration(limits.max_timeout)
        errors.add(KEY, f"Manifest timeout exceeds the maximum of {shown}")
    assert text is not None
    return seconds, text.strip()


def _duration(text: str | None) -> float | None:
    """Seconds of a positive duration, None if `text` is not one."""
    try:
        seconds = parse_duration(text or "")
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def _memory(text: str) -> int | None:
    try:
        size = parse_size(text)
    except ValueError:
        return None
    return size if size >= MIN_MEMORY else None


def _cpus(text: str) -> float | None:
    text = text.strip()
    return float(text) if _CPUS.fullmatch(text) and float(text) > 0 else None


def _pids(text: str) -> int | None:
    text = text.strip()
    return int(text) if _PIDS.fullmatch(text) and int(text) >= 1 else None


# (key, parser, format message, how a cap is shown)
_RESOURCES: tuple[tuple[str, Callable[[str], Any], str, Callable[[Any], str]], ...] = (
    ("memory", _memory, "must be a size such as 512m or 2g", format_size),
    ("cpus", _cpus, "must be a positive number", lambda cpus: f"{cpus:g}"),
    ("pids", _pids, "must be a positive integer", str),
)


def _resources(values: dict[str, str], limits: ManifestLimits | None, errors: Errors) -> Resources:
    chosen: dict[str, Any] = {}
    for key, parse_value, hint, show in _RESOURCES:
        chosen[key] = getattr(limits or DEFAULT_LIMITS, key)
        if key not in values:
            continue
        value = parse_value(values[key])
        cap = getattr(limits, f"max_{key}") if limits is not None else None
        if value is None:
            errors.add(KEY, f"Manifest resources.{key} {hint}")
        elif cap is not None and value > cap:
            errors.add(KEY, f"Manifest resources.{key} exceeds the maximum of {show(cap)}")
        else:
            chosen[key] = value
    return Resources(**chosen)


def _check_enabled(kind: str, drivers: list[str] | None, errors: Errors) -> None:
    if drivers is not None and kind in DRIVERS and kind not in drivers:
        errors.add(KEY, driver_disabled(kind))


def driver_disabled(kind: str) -> str:
    """The `manifest` message for a driver type the submitter may not use (§4 rule 17)."""
    shown = "qemu-x86_64" if kind == "qemu" else kind
    return f"Manifest driver error: {shown} - driver disabled"
