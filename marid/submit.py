"""Submitting builds: numbering, their plans and their snapshots (docs/manifest.md §5, docs/api.md
§7.4).

`submit_many` creates a whole batch with a fixed number of statements, whatever its size (the
scheduler fires hundreds of cron jobs at once); `submit` is a batch of one, the path of
POST /builds. Everything runs in the caller's transaction; the NOTIFY that wakes runners is
delivered only when it commits.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import asyncpg

from marid import builds, caches, channels, manifest
from marid.builds import Build
from marid.manifest import Manifest
from marid.namespaces import Namespace
from marid.users import User
from marid.validation import ValidationError

# Whose stored variables, keys and objects a build snapshots: (owner id, namespace id, whether
# personal resources count: only without a namespace).
Context = tuple[int, int | None, bool]
# A snapshot variable: (variable id or None for a manifest `env` entry, value, sealed, masked).
Value = tuple[int | None, str | None, bytes | None, bool]


@dataclass(frozen=True)
class Submission:
    author: User  # who submitted (the cron's author for scheduled builds)
    owner: User  # the namespace owner, or the author without a namespace
    namespace: Namespace | None
    manifest: Manifest
    comment: str = ""
    tags: tuple[str, ...] = ()  # as the client sent them: invalid names are dropped (§7.1)
    trigger_type: str = "manual"
    trigger_data: dict[str, str] | None = None
    # marid's own tags, added as they are: `cron:<name>` (§11.2) has a `:`, which no client
    # tag may contain.
    system_tags: tuple[str, ...] = ()
    cron_id: int | None = None  # the cron job whose run this build is (§11.7)

    @property
    def context(self) -> Context:
        # Personal resources count only in a build without a namespace, whose owner is its
        # submitter (docs/manifest.md §5.5): what a namespace's collaborators may change runs
        # in its builds, so no personal secret of anyone may be there (issue 11 row 5).
        if self.namespace is None:
            return (self.owner.id, None, True)
        return (self.owner.id, self.namespace.id, False)


@dataclass(frozen=True)
class _Snapshot:
    """What a batch's builds freeze, read before any number is taken."""

    variables: dict[Context, list[tuple[str, Value]]]  # stored ones, in §5.5 order
    keys: dict[Context, list[asyncpg.Record]]
    objects: list[list[int | None]]  # per submission, per manifest `objects` entry


async def submit(conn: asyncpg.Connection, sub: Submission) -> Build:
    """Create the queued build of `sub` with its stages, jobs, artifacts and snapshot."""
    [build] = await submit_many(conn, [sub])
    return build


async def submit_many(conn: asyncpg.Connection, subs: list[Submission]) -> list[Build]:
    """Create the queued builds of `subs`, in order, in six to eight statements whatever their
    number.

    Numbers are taken per owner in `subs` order. The owners' counter rows stay locked until
    the caller's transaction ends, so everything that only reads comes first."""
    if not subs:
        return []
    snapshot = await _read_snapshot(conn, subs)
    tags = [_tags(sub) for sub in subs]
    numbers = await _numbers(conn, [sub.owner.id for sub in subs])
    made = await _insert_builds(conn, subs, numbers, tags)
    plans = [manifest.plan(sub.manifest, number) for sub, number in zip(subs, numbers, strict=True)]
    await _insert_plans(conn, subs, made, plans)
    await _insert_snapshots(conn, subs, made, tags, snapshot)
    await caches.record(  # docs/manifest.md §10
        conn,
        [
            (build.id, caches.Scope(sub.owner.id, sub.context[1]), sub.manifest.cache)
            for sub, build in zip(subs, made, strict=True)
            if sub.manifest.cache is not None
        ],
    )
    return made


async def _read_snapshot(conn: asyncpg.Connection, subs: list[Submission]) -> _Snapshot:
    """Stored variables and keys per distinct context, objects per manifest entry (§5.5)."""
    contexts = list(dict.fromkeys(sub.context for sub in subs))
    owners, spaces, personal = (list(column) for column in zip(*contexts, strict=True))
    variables: dict[Context, list[tuple[str, Value]]] = {c: [] for c in contexts}
    # The owner's un-namespaced variables (detached ones first), then those of the exact
    # namespace, each by key: later entries win.
    for row in await conn.fetch(
        """
        SELECT c.i, v.id, v.key, v.value, v.value_sealed, v.masked
        FROM unnest($1::bigint[], $2::bigint[], $3::boolean[])
             WITH ORDINALITY AS c(owner_id, namespace_id, personal, i)
        JOIN variables v ON (c.personal AND v.user_id = c.owner_id AND v.namespace_id IS NULL)
                            OR v.namespace_id = c.namespace_id
        ORDER BY c.i, v.namespace_id IS NOT NULL, v.key, NOT v.detached, v.id
        """,
        owners,
        spaces,
        personal,
    ):
        value = (row["id"], row["value"], row["value_sealed"], row["masked"])
        variables[contexts[row["i"] - 1]].append((row["key"], value))
    keys: dict[Context, list[asyncpg.Record]] = {c: [] for c in contexts}
    # By name; a namespace key wins on the same name, then one not detached.
    for row in await conn.fetch(
        """
        SELECT c.i, k.id, k.name, k.key_sealed, k.config
        FROM unnest($1::bigint[], $2::bigint[], $3::boolean[])
             WITH ORDINALITY AS c(owner_id, namespace_id, personal, i),
             LATERAL (SELECT DISTINCT ON (name) id, name, key_sealed, config FROM ssh_keys
                      WHERE (c.personal AND user_id = c.owner_id AND namespace_id IS NULL)
                            OR namespace_id = c.namespace_id
                      ORDER BY name, namespace_id IS NULL, detached, id DESC) AS k
        ORDER BY c.i, k.name
        """,
        owners,
        spaces,
        personal,
    ):
        keys[contexts[row["i"] - 1]].append(row)
    return _Snapshot(variables, keys, await _find_objects(conn, subs))


async def _find_objects(conn: asyncpg.Connection, subs: list[Submission]) -> list[list[int | None]]:
    """Each manifest `objects` entry's stored object id: among the namespace's objects, then the
    personal ones (not one a collaborator wrote in a namespace since deleted, issue 11 row 14);
    None for an unknown name."""
    entries = [(i, source) for i, sub in enumerate(subs) for source, _ in sub.manifest.objects]
    found: list[list[int | None]] = [[] for _ in subs]
    if not entries:
        return found
    contexts = [subs[i].context for i, _ in entries]
    rows = await conn.fetch(
        """
        SELECT (SELECT id FROM objects
                WHERE name = e.source AND (namespace_id = e.namespace_id
                                           OR (e.personal AND user_id = e.owner_id
                                               AND namespace_id IS NULL
                                               AND (NOT detached OR author_id = user_id)))
                ORDER BY namespace_id IS NULL, detached, id DESC LIMIT 1) AS id
        FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::boolean[])
             WITH ORDINALITY AS e(source, owner_id, namespace_id, personal, i)
        ORDER BY e.i
        """,
        [source for _, source in entries],
        [c[0] for c in contexts],
        [c[1] for c in contexts],
        [c[2] for c in contexts],
    )
    for (i, _), row in zip(entries, rows, strict=True):
        found[i].append(row["id"])
    return found


async def _numbers(conn: asyncpg.Connection, owner_ids: list[int]) -> list[int]:
    """The number of each build of `owner_ids` (one entry per build), from its owner's
    counter (docs/api.md §7.1).

    One statement for every owner of the batch; it locks their counter rows in owner id order,
    so concurrent batches sharing owners wait for each other instead of deadlocking."""
    wanted = Counter(owner_ids)
    owners = sorted(wanted)
    rows = await conn.fetch(
        """
        INSERT INTO build_counters AS c (user_id, last_number)
        SELECT * FROM unnest($1::bigint[], $2::integer[]) ORDER BY 1
        ON CONFLICT (user_id) DO UPDATE SET last_number = c.last_number + excluded.last_number
        RETURNING user_id, last_number
        """,
        owners,
        [wanted[owner] for owner in owners],
    )
    last = {row["user_id"]: row["last_number"] - wanted[row["user_id"]] for row in rows}
    numbers = []
    for owner_id in owner_ids:
        last[owner_id] += 1
        numbers.append(last[owner_id])
    return numbers


async def _insert_builds(
    conn: asyncpg.Connection, subs: list[Submission], numbers: list[int], tags: list[list[str]]
) -> list[Build]:
    """The build rows, returned in `subs` order."""
    rows = await conn.fetch(
        """
        INSERT INTO builds (user_id, author_id, namespace_id, number, manifest, driver,
                            trigger_type, trigger_comment, trigger_data, timeout_seconds,
                            resources, cron_id, driver_config)
        SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::integer[],
                             $5::text[], $6::text[], $7::text[], $8::text[], $9::jsonb[],
                             $10::double precision[], $11::jsonb[], $12::bigint[],
                             $13::jsonb[])
        RETURNING id, user_id, author_id, namespace_id, number, manifest, driver, status, output,
                  pinned, trigger_type, trigger_comment, trigger_data, created_at, started_at,
                  finished_at
        """,
        *_columns([_build_values(sub, n) for sub, n in zip(subs, numbers, strict=True)], 13),
    )
    by_number = {(row["user_id"], row["number"]): row for row in rows}
    made = []
    for sub, number, names in zip(subs, numbers, tags, strict=True):
        row = dict(by_number[sub.owner.id, number])
        row["trigger_data"] = json.loads(row["trigger_data"])
        row["tags"] = sorted(names, key=str.encode)  # as build_rows orders them
        made.append(Build(**row))
    return made


def _build_values(sub: Submission, number: int) -> tuple[Any, ...]:
    m = sub.manifest
    data = sub.trigger_data or {"email": sub.author.email, "username": sub.author.username}
    resources = {"memory": m.resources.memory, "cpus": m.resources.cpus, "pids": m.resources.pids}
    return (
        sub.owner.id,
        sub.author.id,
        sub.namespace.id if sub.namespace else None,
        number,
        m.text,
        m.driver.type,
        sub.trigger_type,
        sub.comment,
        json.dumps(data),
        m.timeout,
        json.dumps(resources),
        sub.cron_id,
        # Compiled once: runners read the driver settings here, not from the manifest
        # (docs/architecture.md §3.1).
        json.dumps(m.driver.config),
    )


def _tags(sub: Submission) -> list[str]:
    """The client's valid tags, then marid's own, each once."""
    if not sub.tags:
        return list(dict.fromkeys(sub.system_tags))
    return list(dict.fromkeys(builds.normalise_tags(list(sub.tags)) + list(sub.system_tags)))


async def _insert_plans(
    conn: asyncpg.Connection,
    subs: list[Submission],
    made: list[Build],
    plans: list[manifest.Plan],
) -> None:
    """Stages, jobs and artifact records of every build (§5.1-§5.4), in one statement; ids
    follow execution order within a build."""
    stages: list[tuple[Any, ...]] = []
    jobs: list[tuple[Any, ...]] = []
    artifacts: list[tuple[Any, ...]] = []
    for sub, build, plan in zip(subs, made, plans, strict=True):
        for position, stage in enumerate(plan.stages):
            stages.append((build.id, stage.name, stage.allow_failures, position))
            for job_position, job in enumerate(stage.jobs):
                pairs = json.dumps([list(pair) for pair in job.artifacts])
                jobs.append(
                    (build.id, position, job.name, job.commands, job_position, job.timeout, pairs)
                )
        artifacts += [(build.id, sub.owner.id, a.job, a.source, a.name) for a in plan.artifacts]
    await conn.execute(
        """
        WITH stages AS (
            INSERT INTO build_stages (build_id, name, allow_failures, position)
            SELECT * FROM unnest($1::bigint[], $2::text[], $3::boolean[], $4::integer[])
            RETURNING id, build_id, position
        ), jobs AS (
            INSERT INTO build_jobs (build_id, stage_id, name, commands, position,
                                    timeout_seconds, artifacts)
            SELECT j.build_id, s.id, j.name, j.commands, j.position, j.timeout, j.artifacts
            FROM unnest($5::bigint[], $6::integer[], $7::text[], $8::text[], $9::integer[],
                        $10::double precision[], $11::jsonb[])
                 WITH ORDINALITY AS j(build_id, stage, name, commands, position, timeout,
                                      artifacts, i)
            JOIN stages s ON s.build_id = j.build_id AND s.position = j.stage
            ORDER BY j.i
            RETURNING id, build_id, name
        )
        INSERT INTO build_artifacts (build_id, user_id, job_id, source, name)
        SELECT a.build_id, a.user_id, jobs.id, a.source, a.name
        FROM unnest($12::bigint[], $13::bigint[], $14::text[], $15::text[], $16::text[])
             WITH ORDINALITY AS a(build_id, user_id, job, source, name, i)
        JOIN jobs ON jobs.build_id = a.build_id AND jobs.name = a.job
        ORDER BY a.i
        """,
        *_columns(stages, 4),
        *_columns(jobs, 7),
        *_columns(artifacts, 5),
    )


async def _insert_snapshots(
    conn: asyncpg.Connection,
    subs: list[Submission],
    made: list[Build],
    tags: list[list[str]],
    snapshot: _Snapshot,
) -> None:
    """Variables, keys, objects and tags of every build, then one NOTIFY per driver."""
    variables: list[tuple[Any, ...]] = []
    keys: list[tuple[Any, ...]] = []
    objects: list[tuple[Any, ...]] = []
    tagged: list[tuple[Any, ...]] = []
    for sub, build, names, found in zip(subs, made, tags, snapshot.objects, strict=True):
        merged = _merge(snapshot.variables[sub.context], sub.manifest.env)
        variables += [
            (build.id, var_id, key, value, sealed, masked, position)
            for position, (key, (var_id, value, sealed, masked)) in enumerate(merged.items())
        ]
        keys += [
            (build.id, k["id"], k["name"], k["key_sealed"], k["config"], f"/root/.ssh/{k['name']}")
            for k in snapshot.keys[sub.context]
        ]
        objects += [
            (build.id, object_id, source, destination)
            for object_id, (source, destination) in zip(found, sub.manifest.objects, strict=True)
        ]
        tagged += [(build.id, name, sub.author.id) for name in names]
    await conn.execute(
        """
        WITH variables AS (
            INSERT INTO build_variables
                (build_id, variable_id, key, value, value_sealed, masked, position)
            SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[],
                                 $5::bytea[], $6::boolean[], $7::integer[])
        ), keys AS (
            INSERT INTO build_keys (build_id, key_id, name, key_sealed, config, location)
            SELECT * FROM unnest($8::bigint[], $9::bigint[], $10::text[], $11::bytea[],
                                 $12::text[], $13::text[])
        ), objects AS (
            INSERT INTO build_objects (build_id, object_id, source, name)
            SELECT * FROM unnest($14::bigint[], $15::bigint[], $16::text[], $17::text[])
        ), tags AS (
            INSERT INTO build_tags (build_id, name, user_id)
            SELECT * FROM unnest($18::bigint[], $19::text[], $20::bigint[])
        )
        SELECT pg_notify($21, driver) FROM unnest($22::text[]) AS d(driver)
        """,
        *_columns(variables, 7),
        *_columns(keys, 6),
        *_columns(objects, 4),
        *_columns(tagged, 3),
        channels.BUILDS,
        sorted({build.driver for build in made}),
    )


def _merge(stored: list[tuple[str, Value]], env: list[tuple[str, str]]) -> dict[str, Value]:
    """Stored variables, then the manifest's `env`: a later entry wins, and takes the later
    position (§5.5)."""
    final: dict[str, Value] = {}
    for key, value in [*stored, *((key, (None, text, None, False)) for key, text in env)]:
        final.pop(key, None)
        final[key] = value
    return final


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as `width` column lists, for unnest()."""
    return [[row[i] for row in rows] for i in range(width)]


# -- Restarts -----------------------------------------------------------------------------------

RESTART_TAG = "restart"  # every restart carries it (docs/api.md §27)


@dataclass(frozen=True)
class Resume:
    """Where a resumed build starts (`check_resume`): at the job named `job`, at `position`
    in execution order (stage position, job position), from the workspace kept at `place`."""

    job: str
    position: tuple[int, int]
    place: str


async def check_resume(conn: asyncpg.Connection, original: Build, job: str) -> Resume:
    """Whether `original` can be resumed from its job `job` (docs/api.md §27): a job of its
    own stages, every job before it passed, and its workspace still kept. Raises
    ValidationError keyed `from` saying why not. Locks the kept workspace's row until the
    caller's transaction ends."""
    rows = await conn.fetch(
        """
        SELECT j.name, j.status, s.position AS stage, j.position
        FROM build_jobs j JOIN build_stages s ON s.id = j.stage_id
        WHERE j.build_id = $1 ORDER BY s.position, j.position
        """,
        original.id,
    )
    found = [row for row in rows if row["name"] == job]
    if not found:
        raise _cannot_resume(f"Build #{original.number} has no job named {job}")
    target = found[0]
    if target["stage"] == 0:
        raise _cannot_resume(f"{job} is a setup job: restart without from")
    position = (target["stage"], target["position"])
    for row in rows:
        if (row["stage"], row["position"]) >= position:
            break
        if row["status"] not in ("passed", "passed_with_failures"):
            raise _cannot_resume(
                f"Job {row['name']}, before {job}, did not pass: resume from it or an earlier job"
            )
    kept = await conn.fetchrow(
        """
        SELECT place, expires_at, workspace_kept(k) AS kept FROM kept_workspaces k
        WHERE build_id = $1 FOR SHARE
        """,
        original.id,
    )
    if kept is None:
        raise _cannot_resume(
            f"Build #{original.number} has no kept workspace: only a build that ended failed,"
            " killed or timed_out with the docker, os or qemu driver keeps its workspace, for"
            " builds.keep_workspace: restart without from"
        )
    if not kept["kept"]:
        until = kept["expires_at"].strftime("%Y-%m-%dT%H:%M:%SZ")
        raise _cannot_resume(
            f"The workspace of build #{original.number} was kept until {until}"
            " (builds.keep_workspace): restart without from"
        )
    return Resume(job, position, kept["place"])


async def workspace_kept(conn: asyncpg.Connection, build_id: int) -> bool:
    """Whether the build's workspace is kept, so that it can be resumed (docs/api.md §27.2)."""
    kept = await conn.fetchval(
        "SELECT workspace_kept(k) FROM kept_workspaces k WHERE build_id = $1", build_id
    )
    return bool(kept)


def _cannot_resume(message: str) -> ValidationError:
    return ValidationError({"from": [message]})


async def restart(
    conn: asyncpg.Connection, original: Build, author: User, resume: Resume | None = None
) -> Build:
    """A new queued build of `original`'s owner and namespace from its stored plan and
    snapshot, as frozen at its submission (docs/api.md §27): the same manifest, driver
    settings, time limit and resources; stages and jobs (the setup stage renamed for the new
    number); variables, keys, objects and its cache's scope. `author` restarted it: the
    trigger names them. Its tag is `restart`, and `restart_of` links the original. With
    `resume` (`check_resume`), the jobs before it are reused: never run, each with the status
    of the original's job it links, and only a runner reaching the kept workspace takes the
    build. Runs in the caller's transaction; the NOTIFY that wakes runners is sent when it
    commits."""
    [number] = await _numbers(conn, [original.user_id])
    data = json.dumps({"email": author.email, "username": author.username})
    row = await conn.fetchrow(
        """
        INSERT INTO builds (user_id, author_id, namespace_id, number, manifest, driver,
                            trigger_type, trigger_comment, trigger_data, timeout_seconds,
                            resources, driver_config, restart_of, resume_from, resume_place)
        SELECT o.user_id, $2, o.namespace_id, $3, o.manifest, o.driver, 'manual', $4, $5,
               o.timeout_seconds, o.resources, o.driver_config, o.id, $6, $7
        FROM builds o WHERE o.id = $1
        RETURNING id
        """,
        original.id,
        author.id,
        number,
        f"Resume of #{original.number} from {resume.job}"
        if resume
        else f"Restart of #{original.number}",
        data,
        resume.job if resume else None,
        resume.place if resume else None,
    )
    # Jobs before this (stage, job) position are reused; (-1, -1): none is.
    stage_at, job_at = resume.position if resume else (-1, -1)
    new_id = row["id"]
    await conn.execute(
        """
        WITH stages AS (
            INSERT INTO build_stages (build_id, name, allow_failures, position)
            SELECT $2, CASE WHEN s.position = 0 THEN $3 ELSE s.name END, s.allow_failures,
                   s.position
            FROM build_stages s WHERE s.build_id = $1
            RETURNING id, position
        ), jobs AS (
            INSERT INTO build_jobs (build_id, stage_id, name, commands, position,
                                    timeout_seconds, artifacts, status, reused, reused_from)
            SELECT $2, stages.id, j.name, j.commands, j.position, j.timeout_seconds, j.artifacts,
                   CASE WHEN r.reused THEN j.status ELSE 'queued' END, r.reused,
                   CASE WHEN r.reused THEN j.id END
            FROM build_jobs j JOIN build_stages s ON s.id = j.stage_id
            JOIN stages ON stages.position = s.position,
            -- create-driver (the first job of the setup stage) always runs.
            LATERAL (SELECT (s.position, j.position) < ($8::integer, $9::integer)
                            AND (s.position, j.position) <> (0, 0) AS reused) r
            WHERE j.build_id = $1
            ORDER BY s.position, j.position
            RETURNING id, name
        ), artifacts AS (
            INSERT INTO build_artifacts (build_id, user_id, job_id, source, name)
            SELECT $2, a.user_id, jobs.id, a.source, a.name
            FROM build_artifacts a JOIN build_jobs j ON j.id = a.job_id
            JOIN jobs ON jobs.name = j.name
            WHERE a.build_id = $1
            ORDER BY a.id
        ), variables AS (
            INSERT INTO build_variables
                (build_id, variable_id, key, value, value_sealed, masked, position)
            SELECT $2, variable_id, key, value, value_sealed, masked, position
            FROM build_variables WHERE build_id = $1 ORDER BY id
        ), keys AS (
            INSERT INTO build_keys (build_id, key_id, name, key_sealed, config, location)
            SELECT $2, key_id, name, key_sealed, config, location
            FROM build_keys WHERE build_id = $1 ORDER BY id
        ), objects AS (
            INSERT INTO build_objects (build_id, object_id, source, name)
            SELECT $2, object_id, source, name FROM build_objects WHERE build_id = $1 ORDER BY id
        ), tags AS (
            INSERT INTO build_tags (build_id, name, user_id) VALUES ($2, $4, $5)
        ), caches AS (
            INSERT INTO build_caches (build_id, user_id, namespace_id, key, paths)
            SELECT $2, user_id, namespace_id, key, paths FROM build_caches WHERE build_id = $1
        )
        SELECT pg_notify($6, $7)
        """,
        original.id,
        new_id,
        f"setup - #{number}",
        RESTART_TAG,
        author.id,
        channels.BUILDS,
        original.driver,
        stage_at,
        job_at,
    )
    made = await builds.get(conn, new_id)
    assert made is not None
    return made
