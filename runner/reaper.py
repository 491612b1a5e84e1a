"""The runner's reaper: what dead runners and killed builds left on this host and its engine
(the API's reaper is marid/reaper.py).

At start and every `reaper.interval` (docs/configuration.md §1.3) it removes:

- containers, then volumes and networks (`docker.network: build`), labelled for this
  installation (`marid.instance`, set by runner/drivers/docker.py) whose build attempt is
  not `running` under a lease that has not expired: a killed or finished build, an earlier
  attempt, a build whose runner died. Those of other installations sharing the engine, and
  of `marid run` (no installation), are never looked at; a running build's are kept.
- the temporary directories the runner makes (`RUNNER_DIRS`) once older than the grace
  period plus the longest time limit of a running build (at least `builds.max_timeout`): a
  build's directories live no longer than the build, and their age is only the directory's
  own modification time.
- the blob store's unfinished uploads (`BlobStore.remove_partial`), among them the spool
  files of S3 uploads on this host.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from docker.errors import APIError, NotFound

from marid.blobs import BlobStore
from marid.config import Config
from marid.reaper import (
    Reaped,
    forget_kept_volumes,
    kept_at,
    live_attempts,
    longest_running_timeout,
    repeat,
)
from marid.runner.drivers.docker import (
    LABEL_ATTEMPT,
    LABEL_BUILD,
    LABEL_INSTANCE,
    docker_client,
)
from marid.runner.drivers.os import WORKSPACE_PREFIX, os_place
from marid.runner.drivers.qemu import kept_disks, qemu_place

log = logging.getLogger(__name__)

# Prefixes of the temporary directories of runner/execute.py (objects, artifacts),
# runner/caches.py (cache tars) and the drivers (docker image archives; the os driver's
# workspace and scripts).
RUNNER_DIRS = (
    "marid-object-",
    "marid-artifact-",
    "marid-cache-",
    "marid-image-",
    WORKSPACE_PREFIX,
    "marid-scripts-",
)

Attempt = tuple[int, int]  # (build id, attempt) from a container's, volume's or network's labels


@dataclass
class Facts:
    """What the server knows that a sweep needs: which of the asked builds' attempts are
    live, the longest time limit of a running build, and for each asked place the locations
    of the workspaces still kept there and of those no longer kept."""

    live: set[Attempt] = field(default_factory=set)
    longest: float = 0.0
    kept: dict[str, tuple[set[str], set[str]]] = field(default_factory=dict)


# Asks the server for the Facts about (builds, places): the database itself for an in-process
# runner (`db_facts`), the API for a runner on another machine (runner/remote.py).
FactsOf = Callable[[list[int], list[str]], Awaitable[Facts]]


def db_facts(pool: asyncpg.Pool) -> FactsOf:
    async def facts(builds: list[int], places: list[str]) -> Facts:
        async with pool.acquire() as conn:
            found = Facts(
                await live_attempts(conn, builds) if builds else set(),
                await longest_running_timeout(conn),
            )
            for place in places:
                found.kept[place] = await kept_at(conn, place)
            if places:
                await forget_kept_volumes(conn)
        return found

    return facts


class RunnerReaper:
    """One runner's sweeps: `tick(now)` removes what is described above."""

    def __init__(
        self,
        config: Config,
        pool: asyncpg.Pool | None,
        store: BlobStore | None,
        instance: str,
        temp_dir: Path | None = None,
        client: Any = None,
        facts: FactsOf | None = None,
    ) -> None:
        """`facts` (else the database of `pool`) tells what is live; `store` (None: this
        runner has none) is the blob store whose unfinished uploads are removed."""
        if not instance:
            # `marid run` labels its containers with no installation: never take those.
            raise ValueError("the runner's reaper needs this installation's instance label")
        self.config = config
        if facts is None:
            assert pool is not None
            facts = db_facts(pool)
        self.facts = facts
        self.store = store
        self.instance = instance
        self.temp_dir = temp_dir or Path(tempfile.gettempdir())
        self.grace = timedelta(seconds=config.reaper.grace)
        self._client = client  # docker.DockerClient; made on first use unless given
        self._owns_client = client is None

    async def tick(self, now: datetime) -> Reaped:
        """One sweep at `now` (timezone-aware); returns what it removed."""
        before = now - self.grace
        places = [os_place()]
        if "qemu" in self.config.drivers:
            places.append(qemu_place(self.config.qemu_driver))
        facts = await self.facts([], places)
        running = facts.longest
        kept, expired = facts.kept.get(places[0], (set(), set()))
        disks = facts.kept[places[1]][1] if len(places) > 1 else set()
        longest = timedelta(seconds=max(self.config.builds.max_timeout, running))
        files = await asyncio.to_thread(remove_kept_dirs, self.temp_dir, expired)
        files += await asyncio.to_thread(
            remove_kept_disks, kept_disks(self.config.qemu_driver), disks
        )
        files += await asyncio.to_thread(
            remove_old_dirs, self.temp_dir, before - longest, {Path(p) for p in kept}
        )
        partial = await self.store.remove_partial(before) if self.store is not None else 0
        reaped = Reaped(files=files, partial=partial)
        networks = 0
        if "docker" in self.config.drivers:
            reaped.containers, reaped.volumes, networks = await self._engine()
        if reaped:
            log.info("runner reaper removed %s", reaped)
        if networks:  # not in Reaped, which marid/reaper.py owns
            log.info("runner reaper removed %d networks", networks)
        return reaped

    async def _engine(self) -> tuple[int, int, int]:
        """Remove the containers, volumes and networks of this installation that no live
        attempt uses; returns how many of each went."""
        if self._client is None:
            self._client = await asyncio.to_thread(docker_client, self.config.docker.host)
        try:
            labelled = await asyncio.to_thread(self._labelled)
            builds = sorted({build for owners in labelled for build, _ in owners.values()})
            live = (await self.facts(builds, [])).live if builds else set()
            gone = [
                [item for item, owner in owners.items() if owner not in live] for owners in labelled
            ]
            return await asyncio.to_thread(self._remove, *gone)
        except Exception:
            if self._owns_client:  # the engine may have restarted: connect afresh next time
                client, self._client = self._client, None
                await asyncio.to_thread(client.close)
            raise

    def _labelled(self) -> tuple[dict[str, Attempt], dict[str, Attempt], dict[str, Attempt]]:
        """This installation's containers (by id), volumes (by name) and networks (by id), with
        their owners."""
        filters = {"label": [f"{LABEL_INSTANCE}={self.instance}"]}
        api = self._client.api
        containers = _owners(
            (c["Id"], c.get("Labels")) for c in api.containers(all=True, filters=filters)
        )
        volumes = _owners(
            (v["Name"], v.get("Labels")) for v in api.volumes(filters=filters).get("Volumes") or []
        )
        networks = _owners((n["Id"], n.get("Labels")) for n in api.networks(filters=filters))
        return containers, volumes, networks

    def _remove(
        self, containers: list[str], volumes: list[str], networks: list[str]
    ) -> tuple[int, int, int]:
        """Force-remove `containers`, then `volumes` and `networks` (which their containers
        must have left); returns how many of each went."""
        api = self._client.api
        return (
            _remove_each(containers, api.remove_container),
            _remove_each(volumes, api.remove_volume),
            _remove_each(networks, lambda network, force: api.remove_network(network)),
        )

    def close(self) -> None:
        """Release the engine connection this reaper made."""
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None


def _owners(items: Iterable[tuple[str, dict[str, str] | None]]) -> dict[str, Attempt]:
    """The build attempt of each item; items whose labels name none are left alone."""
    owners: dict[str, Attempt] = {}
    for item, labels in items:
        build, attempt = (labels or {}).get(LABEL_BUILD, ""), (labels or {}).get(LABEL_ATTEMPT, "")
        if build.isdigit() and attempt.isdigit():
            owners[item] = (int(build), int(attempt))
    return owners


def _remove_each(items: list[str], remove: Callable[..., Any]) -> int:
    removed = 0
    for item in items:
        try:
            remove(item, force=True)
        except NotFound:
            continue  # removed meanwhile (its driver's destroy, another runner)
        except APIError as exc:  # e.g. in use: tried again at the next sweep
            log.warning("could not remove %s: %s", item, exc.explanation or exc)
            continue
        removed += 1
    return removed


def remove_kept_dirs(directory: Path, locations: set[str]) -> int:
    """Remove the os driver's workspaces at `locations` that are no longer kept (docs/api.md
    §27), each only when it is one of its workspaces in `directory`; returns how many went."""
    removed = 0
    for location in locations:
        path = Path(location)
        if path.parent != directory or not path.name.startswith(WORKSPACE_PREFIX):
            log.warning("not removing %s: not a workspace of this runner", location)
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def remove_kept_disks(directory: Path, locations: set[str]) -> int:
    """Remove the kept VM disks at `locations` that are no longer kept (docs/api.md §27), each
    only when it is a file of `directory`; returns how many went."""
    removed = 0
    for location in locations:
        path = Path(location)
        if path.parent != directory or path.suffix != ".qcow2" or path.is_symlink():
            log.warning("not removing %s: not a kept disk of this runner", location)
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
    return removed


def remove_old_dirs(
    directory: Path, before: datetime, kept: frozenset[Path] | set[Path] = frozenset()
) -> int:
    """Remove the runner's temporary directories (`RUNNER_DIRS`) in `directory` last modified
    before `before`, except the workspaces still `kept`; returns how many went. Never follows
    a symbolic link."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not entry.name.startswith(RUNNER_DIRS) or Path(entry.path) in kept:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or info.st_mtime >= before.timestamp():
                continue
            shutil.rmtree(entry.path)
        except (FileNotFoundError, PermissionError):
            continue  # gone meanwhile, or another user's: not ours to remove
        except OSError as exc:
            log.warning("could not remove %s: %s", entry.path, exc)
            continue
        removed += 1
    return removed


async def run(
    config: Config,
    pool: asyncpg.Pool | None,
    store: BlobStore | None,
    instance: str,
    stop: asyncio.Event,
    facts: FactsOf | None = None,
) -> None:
    """The runner's reaper until `stop` is set: a sweep now, then every `reaper.interval`.

    A failing sweep (database, engine or blob store away) is retried with backoff and never
    ends it; `instance` is the installation's label (runner/worker.py `instance_of`).
    """
    sweeper = RunnerReaper(config, pool, store, instance, facts=facts)
    try:
        await repeat(sweeper.tick, config.reaper.interval, stop, "runner reaper")
    finally:
        sweeper.close()
