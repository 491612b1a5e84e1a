"""What a runner is handed when it claims a build (docs/runners.md §3): the build's stored plan
with that build's secrets decrypted, and the server's settings that shape the run.

An in-process runner makes it with `make` from its own database connection; a runner on another
machine gets it as JSON (`to_json`, `from_json`) in the answer to its claim, from an API that
made it the same way. Either way it is built by the one function, so both kinds of runner run
the same thing. It holds plaintext secrets: never log it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg

from marid import caches, keys, lifecycle, variables
from marid.config import Config
from marid.crypto import Cipher
from marid.lifecycle import Claim


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    commands: str  # one command per line
    timeout: float | None
    artifacts: list[tuple[str, str]]  # (source, name)
    reused: str | None = None  # a resumed build's job that does not run: its status


@dataclass(frozen=True)
class Stage:
    name: str
    allow_failures: bool
    jobs: list[Job]


@dataclass(frozen=True)
class Key:
    name: str
    private_key: str = field(repr=False)
    config: str = ""


@dataclass(frozen=True)
class Object:
    id: int
    source: str
    destination: str
    stored: bool  # False: the stored object is gone (docs/manifest.md §6.4)


@dataclass(frozen=True)
class Cache:
    key: str
    paths: list[str]
    max_size: int  # bytes; a larger tar is not saved
    limit_setting: str  # the setting that sets max_size, for the message


@dataclass(frozen=True)
class Workspace:
    """A kept workspace a resumed build starts from (docs/api.md §27)."""

    driver: str
    place: str
    location: str


@dataclass(frozen=True)
class Resume:
    original: int  # the original build's number
    job: str
    workspace: Workspace | None  # None: no longer kept


@dataclass(frozen=True)
class Settings:
    """The server's settings that shape the run."""

    max_output: int  # builds.max_output
    artifact_max_size: int  # artifacts.max_size
    keep_workspace: float  # builds.keep_workspace, seconds


@dataclass(frozen=True)
class Plan:
    build_id: int
    attempt: int
    driver: str
    driver_config: dict[str, str]  # the manifest's `driver` mapping, `type` included
    timeout: float
    memory: int
    cpus: float
    pids: int
    stages: list[Stage]
    env: list[tuple[str, str]] = field(repr=False)  # in environment order
    secrets: list[str] = field(repr=False)  # plaintexts of the masked values
    keys: list[Key]
    objects: list[Object]
    settings: Settings
    previous: str | None = None  # why the previous attempt ended
    resume: Resume | None = None
    cache: Cache | None = None

    @property
    def claim(self) -> Claim:
        return Claim(self.build_id, self.attempt)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def from_json(data: dict[str, Any]) -> Plan:
    """The plan a claim's answer carries (KeyError or TypeError when it is not one)."""
    resume = data.get("resume")
    cache = data.get("cache")
    return Plan(
        build_id=int(data["build_id"]),
        attempt=int(data["attempt"]),
        driver=str(data["driver"]),
        driver_config={str(k): str(v) for k, v in data["driver_config"].items()},
        timeout=float(data["timeout"]),
        memory=int(data["memory"]),
        cpus=float(data["cpus"]),
        pids=int(data["pids"]),
        stages=[
            Stage(
                s["name"],
                bool(s["allow_failures"]),
                [
                    Job(
                        int(j["id"]),
                        j["name"],
                        j["commands"],
                        j["timeout"],
                        [(a, b) for a, b in j["artifacts"]],
                        j.get("reused"),
                    )
                    for j in s["jobs"]
                ],
            )
            for s in data["stages"]
        ],
        env=[(str(k), str(v)) for k, v in data["env"]],
        secrets=[str(s) for s in data["secrets"]],
        keys=[Key(k["name"], k["private_key"], k["config"]) for k in data["keys"]],
        objects=[
            Object(int(o["id"]), o["source"], o["destination"], bool(o["stored"]))
            for o in data["objects"]
        ],
        settings=Settings(**data["settings"]),
        previous=data.get("previous"),
        resume=(
            Resume(
                int(resume["original"]),
                resume["job"],
                Workspace(**resume["workspace"]) if resume["workspace"] else None,
            )
            if resume
            else None
        ),
        cache=Cache(**cache) if cache else None,
    )


async def make(
    conn: asyncpg.Connection, claim: Claim, cipher: Cipher, config: Config
) -> tuple[Plan, lifecycle.ClaimedBuild, caches.BuildCache | None]:
    """The plan of the claimed build, its masked values and keys decrypted (a value that does
    not decrypt raises crypto's error: an infrastructure failure, a new attempt); with the
    stored build and its cache's scope, which the server keeps to itself. Only reads."""
    build = await lifecycle.load(conn, claim)
    found = await caches.of_build(conn, claim.build_id)
    env: list[tuple[str, str]] = []
    secrets: list[str] = []
    for var in build.variables:
        value = var.value
        if var.masked:
            assert var.sealed is not None
            value = variables.decrypt_value(cipher, build.owner_id, var.key, var.sealed)
            secrets.append(value)
        assert value is not None
        env.append((var.key, value))
    resume = None
    if build.resume is not None:
        kept = build.resume.workspace
        workspace = Workspace(kept.driver, kept.place, kept.location) if kept else None
        resume = Resume(build.resume.original, build.resume.job, workspace)
    cache = None
    if found is not None:
        limits = config.caches
        if limits.max_size <= limits.max_total:
            limit, setting = limits.max_size, "caches.max_size"
        else:
            limit, setting = limits.max_total, "caches.max_total"
        cache = Cache(found.key, list(found.paths), limit, setting)
    plan = Plan(
        build_id=claim.build_id,
        attempt=claim.attempt,
        driver=build.driver,
        driver_config=build.driver_config,
        timeout=build.timeout,
        memory=build.resources.memory,
        cpus=build.resources.cpus,
        pids=build.resources.pids,
        stages=[
            Stage(
                s.name,
                s.allow_failures,
                [Job(j.id, j.name, j.commands, j.timeout, j.artifacts, j.reused) for j in s.jobs],
            )
            for s in build.stages
        ],
        env=env,
        secrets=secrets,
        keys=[
            Key(k.name, keys.decrypt_key(cipher, build.owner_id, k.name, k.sealed), k.config)
            for k in build.keys
        ],
        objects=[
            Object(o.id, o.source, o.destination, o.blob_key is not None) for o in build.objects
        ],
        settings=Settings(
            config.builds.max_output,
            config.artifacts.max_size,
            config.builds.keep_workspace,
        ),
        previous=build.previous,
        resume=resume,
        cache=cache,
    )
    return plan, build, found
