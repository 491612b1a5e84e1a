"""A build's lifecycle after submission: every state transition of `builds` and its
`build_*` rows, and what a runner needs to execute a claimed build (docs/architecture.md §3.1,
§3.2; docs/manifest.md §6).

marid/submit.py creates a build `queued`. From there a runner `claim`s it (`running`, attempt
+ 1, leased), `renew`s the lease, `load`s the stored plan and reports as it executes:
`job_started`, `append_output`, `job_finished`, `object_placed`, `key_placed`,
`artifact_recorded` and finally `build_finished`. `kill` ends a queued build at once or asks
a running one's runner to stop; any runner's `recover_expired` requeues builds whose lease ran
out, or ends them with `finish_killed` when their kill was asked.

Every write a runner makes after its claim passes the fence first (`fence`, the SQL function
`fence_build` of migrations/0011_build_lifecycle.sql): it locks the build row until the
caller's transaction ends, or raises LostLease when the build is no longer `running` under the
claimed attempt. So a runner presumed dead cannot change a build that was recovered or
finished meanwhile. Functions take `conn` first and never open a transaction: the caller owns
it, and a fenced write needs one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import asyncpg

from marid import channels, manifest, output
from marid.blobs import Blob
from marid.manifest import Resources

FENCED_OUT = "MF001"  # the SQLSTATE fence_build raises


class LostLease(Exception):
    """This attempt no longer holds its build (recovered, or finished): the runner abandons
    it and writes nothing more."""


@dataclass(frozen=True)
class Claim:
    build_id: int
    attempt: int


async def claim(
    conn: asyncpg.Connection,
    runner: str,
    drivers: list[str],
    lease: float,
    author_limit: int | None = None,
    places: list[str] | None = None,
) -> Claim | None:
    """Take the oldest queued build for one of `drivers` that nothing holds back (`running`,
    the next attempt, leased for `lease` seconds), or None when there is none. A build is held
    back by its retry time, an image still downloading, its namespace's `max_running` or, with
    `author_limit`, its author's running builds (the SQL function `claim_build` of
    migrations/0020_build_limits.sql and 0022, which serialises the claims that a limit
    applies to). A resumed build is taken only by a runner that reaches its workspace's place,
    one of `places`."""
    row = await conn.fetchrow(
        "SELECT claimed_id, claimed_attempt FROM claim_build($1, $2, $3, $4, $5)",
        runner,
        drivers,
        lease,
        author_limit,
        places or [],
    )
    return Claim(row["claimed_id"], row["claimed_attempt"]) if row else None


async def next_retry(conn: asyncpg.Connection, drivers: list[str]) -> float | None:
    """Seconds until the earliest retry of a queued build for one of `drivers` may be claimed
    (`retry_at`), or None when none waits."""
    seconds = await conn.fetchval(
        """
        SELECT extract(epoch FROM min(retry_at) - now())::float8 FROM builds
        WHERE status = 'queued' AND driver = ANY($1::text[]) AND retry_at > now()
        """,
        drivers,
    )
    return None if seconds is None else max(float(seconds), 0.0)


async def fence(conn: asyncpg.Connection, claim: Claim) -> None:
    """Lock the build row until the caller's transaction ends, if `claim` still holds the
    build; LostLease otherwise. Every runner write calls this first."""
    if not conn.is_in_transaction():
        # Outside a transaction the lock would end with this statement, before the write.
        raise RuntimeError("a fenced write needs the caller's transaction")
    try:
        await conn.execute("SELECT fence_build($1, $2)", claim.build_id, claim.attempt)
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == FENCED_OUT:
            raise LostLease(f"build {claim.build_id} attempt {claim.attempt}") from exc
        raise


async def renew(conn: asyncpg.Connection, claim: Claim, lease: float) -> bool:
    """Extend the lease to `lease` seconds from now; returns whether a kill was requested.
    Fenced."""
    await fence(conn, claim)
    killed = await conn.fetchval(
        """
        UPDATE builds SET lease_expires_at = now() + make_interval(secs => $2)
        WHERE id = $1 RETURNING kill_requested
        """,
        claim.build_id,
        lease,
    )
    return bool(killed)


# -- What a runner executes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    commands: str  # one command per line
    timeout: float | None
    artifacts: list[tuple[str, str]]  # (source, name), collected after the job
    reused: str | None = None  # a resumed build's job that does not run: the status it reuses


@dataclass(frozen=True)
class Stage:
    name: str
    allow_failures: bool
    jobs: list[Job]


@dataclass(frozen=True)
class Variable:
    key: str
    value: str | None  # None when masked
    sealed: bytes | None = field(repr=False)  # a masked value (docs/architecture.md §6.2)
    masked: bool


@dataclass(frozen=True)
class Key:
    name: str
    sealed: bytes = field(repr=False)  # the private key (docs/architecture.md §6.2)
    config: str


@dataclass(frozen=True)
class Object:
    id: int
    source: str
    destination: str
    blob_key: str | None  # None: the stored object is gone (docs/manifest.md §6.4)


@dataclass(frozen=True)
class ClaimedBuild:
    """A claimed build as stored at submission: its plan (docs/manifest.md §5.1-§5.4), its
    snapshot (§5.5, sealed values still sealed) and its driver settings."""

    claim: Claim
    owner_id: int
    namespace_id: int | None
    driver: str
    driver_config: dict[str, str]  # the manifest's `driver` mapping, `type` included
    timeout: float  # seconds, for the whole build
    resources: Resources
    stages: list[Stage]  # in execution order; the first is the setup stage
    variables: list[Variable]  # in environment order
    keys: list[Key]
    objects: list[Object]
    previous: str | None = None  # why the previous attempt ended (`attempt 1: <reason>`)
    resume: Resume | None = None  # a resumed build: the workspace it starts from


@dataclass(frozen=True)
class Resume:
    """Where a resumed build starts (docs/api.md §27): a copy of the workspace its original
    kept (None when it is gone: expired, or its row deleted), from the job `job`."""

    original: int  # the original's number
    job: str
    workspace: KeptWorkspace | None


@dataclass(frozen=True)
class KeptWorkspace:
    """A workspace a build left behind for resuming it (the table kept_workspaces)."""

    build_id: int
    attempt: int
    driver: str
    place: str
    location: str


async def load(conn: asyncpg.Connection, claim: Claim) -> ClaimedBuild:
    """Everything needed to execute the claimed build. Only reads."""
    build = await conn.fetchrow(
        """
        SELECT b.user_id, b.namespace_id, b.driver, b.driver_config, b.manifest,
               b.timeout_seconds, b.resources, b.retry_reason, b.resume_from,
               o.number AS original, k.build_id AS kept_build, k.attempt AS kept_attempt,
               k.driver AS kept_driver, k.place, k.location
        FROM builds b
        LEFT JOIN builds o ON o.id = b.restart_of
        LEFT JOIN kept_workspaces k ON k.build_id = b.restart_of AND b.resume_from IS NOT NULL
        WHERE b.id = $1
        """,
        claim.build_id,
    )
    resume = None
    if build["resume_from"] is not None:
        kept = None
        if build["kept_build"] is not None:
            kept = KeptWorkspace(
                build["kept_build"],
                build["kept_attempt"],
                build["kept_driver"],
                build["place"],
                build["location"],
            )
        resume = Resume(build["original"], build["resume_from"], kept)
    if build["driver_config"] is not None:
        driver_config = json.loads(build["driver_config"])
    else:  # submitted before migration 0011 stored it: parse this once
        driver_config = manifest.parse(build["manifest"]).driver.config
    return ClaimedBuild(
        claim=claim,
        owner_id=build["user_id"],
        namespace_id=build["namespace_id"],
        driver=build["driver"],
        driver_config=driver_config,
        timeout=build["timeout_seconds"],
        resources=Resources(**json.loads(build["resources"])),
        stages=await _stages(conn, claim.build_id),
        variables=await _variables(conn, claim.build_id),
        keys=await _keys(conn, claim.build_id),
        objects=await _objects(conn, claim.build_id),
        previous=build["retry_reason"],
        resume=resume,
    )


async def _stages(conn: asyncpg.Connection, build_id: int) -> list[Stage]:
    rows = await conn.fetch(
        """
        SELECT s.name AS stage, s.allow_failures, j.id, j.name, j.commands,
               j.timeout_seconds, j.artifacts,
               CASE WHEN j.reused THEN j.status END AS reused
        FROM build_stages s JOIN build_jobs j ON j.stage_id = s.id
        WHERE s.build_id = $1 ORDER BY s.position, j.position
        """,
        build_id,
    )
    stages: dict[str, Stage] = {}
    for row in rows:
        stage = stages.setdefault(row["stage"], Stage(row["stage"], row["allow_failures"], []))
        artifacts = [(source, name) for source, name in json.loads(row["artifacts"])]
        stage.jobs.append(
            Job(
                row["id"],
                row["name"],
                row["commands"],
                row["timeout_seconds"],
                artifacts,
                row["reused"],
            )
        )
    return list(stages.values())


async def _variables(conn: asyncpg.Connection, build_id: int) -> list[Variable]:
    rows = await conn.fetch(
        "SELECT key, value, value_sealed, masked FROM build_variables"
        " WHERE build_id = $1 ORDER BY position",
        build_id,
    )
    return [Variable(r["key"], r["value"], r["value_sealed"], r["masked"]) for r in rows]


async def _keys(conn: asyncpg.Connection, build_id: int) -> list[Key]:
    rows = await conn.fetch(
        "SELECT name, key_sealed, config FROM build_keys WHERE build_id = $1 ORDER BY name",
        build_id,
    )
    return [Key(r["name"], r["key_sealed"], r["config"]) for r in rows]


async def _objects(conn: asyncpg.Connection, build_id: int) -> list[Object]:
    rows = await conn.fetch(
        """
        SELECT bo.id, bo.source, bo.name, o.blob_key
        FROM build_objects bo LEFT JOIN objects o ON o.id = bo.object_id
        WHERE bo.build_id = $1 ORDER BY bo.id
        """,
        build_id,
    )
    return [Object(r["id"], r["source"], r["name"], r["blob_key"]) for r in rows]


# -- Fenced writes of the runner executing the build --------------------------------------------


async def job_started(
    conn: asyncpg.Connection, claim: Claim, job_id: int, ago: float = 0.0
) -> None:
    """The job is `running`, since `ago` seconds (a runner on another machine reports what
    happened in batches: marid/reports.py). A job that has ended already stays as it ended
    (the report sent again, with the job's end, after an answer was lost). Fenced."""
    await fence(conn, claim)
    await conn.execute(
        """
        UPDATE build_jobs SET status = 'running',
            started_at = now() - make_interval(secs => $3)
        WHERE build_id = $1 AND id = $2 AND finished_at IS NULL
        """,
        claim.build_id,
        job_id,
        ago,
    )


async def append_output(
    conn: asyncpg.Connection,
    claim: Claim,
    job_id: int,
    offset: int,
    text: str,
    forget: tuple[int, int] | None = None,
) -> None:
    """Store a chunk of the job's live output at UTF-8 byte `offset` and wake its live readers
    (docs/api.md §19) when the caller commits; the chunks starting in the byte range `forget`
    go (output over builds.max_output, docs/architecture.md §6.1). A chunk already at `offset`
    is this one, written again after a commit whose acknowledgement was lost: kept. Fenced."""
    await fence(conn, claim)
    await conn.execute(
        """
        INSERT INTO build_job_output (job_id, attempt, byte_offset, text)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT DO NOTHING
        """,
        job_id,
        claim.attempt,
        offset,
        text,
    )
    if forget is not None:
        await conn.execute(
            """
            DELETE FROM build_job_output
            WHERE job_id = $1 AND attempt = $2 AND byte_offset >= $3 AND byte_offset < $4
            """,
            job_id,
            claim.attempt,
            *forget,
        )
    await conn.execute("SELECT pg_notify($1, $2)", channels.OUTPUT, str(job_id))


async def job_finished(
    conn: asyncpg.Connection,
    claim: Claim,
    job_id: int,
    status: str,
    ran: bool,
    final: output.Final | None = None,
    ago: float = 0.0,
) -> None:
    """The job ends with `status`, `ago` seconds ago (see job_started). One that `ran` keeps
    its output once (docs/architecture.md §6.1): `final`, as its runner stored it (blob store,
    or text for the row), or else its live chunks, joined into the row when they hold at most
    output.ROW_LIMIT bytes and left as they are otherwise. One that never started keeps no
    times and no output (docs/manifest.md §6.1). A job that has ended already (the write
    repeated after a commit whose acknowledgement was lost) stays as it ended. Readers wake on
    commit. Fenced."""
    await fence(conn, claim)
    size = await conn.fetchval(
        """
        SELECT coalesce(sum(octet_length(text)), 0) FROM build_job_output
        WHERE job_id = $1 AND attempt = $2
        """,
        job_id,
        claim.attempt,
    )
    in_row = final is None and size <= output.ROW_LIMIT
    await conn.execute(
        """
        UPDATE build_jobs j SET status = $3, finished_at = now() - make_interval(secs => $13),
            started_at = CASE WHEN $4
                THEN coalesce(j.started_at, now() - make_interval(secs => $13)) END,
            output = CASE WHEN NOT $4 THEN NULL
                WHEN $7::text IS NOT NULL OR $6::text IS NOT NULL THEN $7
                WHEN $12 THEN coalesce(
                    (SELECT string_agg(o.text, '' ORDER BY o.byte_offset)
                     FROM build_job_output o WHERE o.job_id = j.id AND o.attempt = $5), '')
            END,
            output_blob_key = CASE WHEN $4 THEN $6 END,
            output_size = CASE WHEN $4 THEN $8::bigint END,
            output_printed = CASE WHEN $4 THEN $9::bigint END,
            output_head = CASE WHEN $4 THEN $10::bigint END,
            output_tail = CASE WHEN $4 THEN $11::bigint END
        WHERE j.build_id = $1 AND j.id = $2 AND j.finished_at IS NULL
        """,
        claim.build_id,
        job_id,
        status,
        ran,
        claim.attempt,
        final.blob_key if final else None,
        final.text if final else None,
        final.size if final else size,
        final.printed if final else size,
        final.head if final else None,
        final.tail if final else None,
        in_row,
        ago,
    )
    if in_row or final is not None or not ran:
        await conn.execute("DELETE FROM build_job_output WHERE job_id = $1", job_id)
    await conn.execute("SELECT pg_notify($1, $2)", channels.OUTPUT, str(job_id))


async def object_placed(conn: asyncpg.Connection, claim: Claim, object_id: int) -> None:
    """The build object `object_id` was placed in the workspace. Fenced."""
    await fence(conn, claim)
    await conn.execute(
        "UPDATE build_objects SET placed = true WHERE build_id = $1 AND id = $2",
        claim.build_id,
        object_id,
    )


async def key_placed(conn: asyncpg.Connection, claim: Claim, name: str, location: str) -> None:
    """The SSH key `name` was written at `location`. Fenced."""
    await fence(conn, claim)
    await conn.execute(
        "UPDATE build_keys SET location = $3 WHERE build_id = $1 AND name = $2",
        claim.build_id,
        name,
        location,
    )


async def artifact_recorded(
    conn: asyncpg.Connection, claim: Claim, job_id: int, source: str, name: str, blob: Blob
) -> str | None:
    """The artifact `name` now has the content `blob`, collected from `source` after the job.
    Returns the blob key it replaced, to delete after commit. Fenced; LookupError when the
    build declares no such artifact."""
    await fence(conn, claim)
    row = await conn.fetchrow(
        """
        WITH old AS (
            SELECT id, blob_key FROM build_artifacts
            WHERE build_id = $1 AND name = $2 FOR UPDATE
        )
        UPDATE build_artifacts a SET blob_key = $3, size = $4, md5 = $5, sha256 = $6,
            job_id = $7, source = $8
        FROM old WHERE a.id = old.id
        RETURNING old.blob_key AS replaced
        """,
        claim.build_id,
        name,
        blob.key,
        blob.size,
        blob.md5,
        blob.sha256,
        job_id,
        source,
    )
    if row is None:
        raise LookupError(f"build {claim.build_id} declares no artifact {name!r}")
    replaced: str | None = row["replaced"]
    return replaced


async def build_finished(
    conn: asyncpg.Connection,
    claim: Claim,
    status: str,
    kept: KeptWorkspace | None = None,
    keep_for: float = 0.0,
) -> None:
    """The build ends with `status` (docs/manifest.md §6.9), leaving `kept`, its workspace,
    for `keep_for` seconds for resuming it (docs/api.md §27). Fenced."""
    await fence(conn, claim)
    await _end(conn, claim.build_id, status)
    if kept is not None:
        await conn.execute(
            """
            INSERT INTO kept_workspaces (build_id, attempt, driver, place, location, expires_at)
            VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
            ON CONFLICT (build_id) DO UPDATE
            SET attempt = excluded.attempt, driver = excluded.driver, place = excluded.place,
                location = excluded.location, expires_at = excluded.expires_at
            """,
            claim.build_id,
            claim.attempt,
            kept.driver,
            kept.place,
            kept.location,
            keep_for,
        )


async def _end(conn: asyncpg.Connection, build_id: int, status: str) -> None:
    """Give the build its final `status`. Its output is its jobs' outputs, stored once in
    their rows and composed when read (marid/builds.py), never copied here."""
    await conn.execute(
        """
        UPDATE builds b SET status = $2, finished_at = now(), lease_expires_at = NULL
        WHERE b.id = $1
        """,
        build_id,
        status,
    )


# -- Kills and recovery -------------------------------------------------------------------------


async def kill(conn: asyncpg.Connection, build_id: int) -> bool:
    """Kill a build (docs/api.md §7.6): a queued one ends `killed` now without running; a
    running one is flagged and its runner, woken by NOTIFY on commit, stops it within a second.
    Returns whether the build ended here."""
    queued = await conn.fetchval(
        "SELECT id FROM builds WHERE id = $1 AND status = 'queued' FOR UPDATE", build_id
    )
    if queued is not None:
        await finish_killed(conn, build_id)
        return True
    running = await conn.fetchval(
        """
        UPDATE builds SET kill_requested = true
        WHERE id = $1 AND status = 'running' RETURNING id
        """,
        build_id,
    )
    if running is not None:
        await conn.execute("SELECT pg_notify($1, $2)", channels.KILL, str(build_id))
    return False


async def finish_killed(conn: asyncpg.Connection, build_id: int) -> None:
    """End a build and its unfinished jobs `killed`, when no runner will: a queued build's kill,
    or a running build's whose runner vanished after the kill was asked. The caller holds the
    build row locked."""
    ended = await conn.fetch(
        """
        UPDATE build_jobs SET status = 'killed', finished_at = now()
        WHERE build_id = $1 AND status IN ('queued', 'running') RETURNING id
        """,
        build_id,
    )
    await _end(conn, build_id, "killed")
    await _notify_jobs(conn, [row["id"] for row in ended])


async def _notify_jobs(conn: asyncpg.Connection, job_ids: list[int]) -> None:
    """Wake the live readers of jobs whose status changed without new output (on commit)."""
    for job_id in job_ids:
        await conn.execute("SELECT pg_notify($1, $2)", channels.OUTPUT, str(job_id))


@dataclass(frozen=True)
class Recovered:
    build_ids: list[int]  # requeued
    killed: list[int]  # kill requested before the runner vanished: ended `killed` here
    stale_blobs: list[str]  # artifact content of the dead attempts: delete after commit
    failed: list[int] = field(default_factory=list)  # their last attempt: ended `failed` here


async def recover_expired(conn: asyncpg.Connection, max_attempts: int) -> Recovered:
    """Requeue builds whose runner's lease ran out (docs/manifest.md §6.13): the lost lease
    counts as a failed attempt, so a build on its `max_attempts`th ends `failed`; a build whose
    kill was requested ends `killed`. Runners wake on commit."""
    rows = await conn.fetch(
        """
        SELECT id, attempt, kill_requested FROM builds
        WHERE status = 'running' AND lease_expires_at < now()
        FOR UPDATE SKIP LOCKED
        """
    )
    recovered = Recovered([], [], [], [])
    for row in rows:
        ended = await _attempt_over(
            conn, Claim(row["id"], row["attempt"]), LEASE_LOST, max_attempts, 0.0
        )
        if row["kill_requested"]:
            recovered.killed.append(row["id"])
        elif ended.retried:
            recovered.build_ids.append(row["id"])
        else:
            recovered.failed.append(row["id"])
        recovered.stale_blobs.extend(ended.stale_blobs)
    return recovered


# -- Attempts that end outside the user's commands ----------------------------------------------

LEASE_LOST = "runner lost its lease"


def attempt_notice(attempt: int, previous: str) -> str:
    """The line that opens a retried attempt's output: `marid: attempt 2 (attempt 1: <why>)`."""
    return f"marid: attempt {attempt} ({previous})"


@dataclass(frozen=True)
class AttemptOver:
    retried: bool  # queued for a new attempt; False: the build ended (`failed`, or `killed`)
    stale_blobs: list[str]  # artifact content of the attempt: delete after commit


async def attempt_failed(
    conn: asyncpg.Connection, claim: Claim, reason: str, max_attempts: int, delay: float
) -> AttemptOver:
    """The attempt `claim` ended for `reason`, outside the user's commands (blob store, engine,
    database, decryption, a lost lease; docs/manifest.md §6.13). Before `max_attempts` the build
    is queued again, claimable after `delay` seconds; on the last it ends `failed` with
    `marid: attempt N of M failed: <reason>; giving up` as its last line. Fenced."""
    await fence(conn, claim)
    return await _attempt_over(conn, claim, reason, max_attempts, delay)


async def _attempt_over(
    conn: asyncpg.Connection, claim: Claim, reason: str, max_attempts: int, delay: float
) -> AttemptOver:
    """attempt_failed, for a build the caller holds locked `running` under `claim`."""
    build = await conn.fetchrow(
        "SELECT user_id, kill_requested FROM builds WHERE id = $1", claim.build_id
    )
    if build["kill_requested"]:  # nobody wants another attempt
        await finish_killed(conn, claim.build_id)
        return AttemptOver(False, [])
    if claim.attempt >= max_attempts:
        line = f"marid: attempt {claim.attempt} of {max_attempts} failed: {reason}; giving up"
        await _give_up(conn, claim, line)
        return AttemptOver(False, [])
    stale = await _reset(conn, claim.build_id, build["user_id"])
    await conn.execute(
        """
        UPDATE builds SET retry_reason = $2,
            retry_at = CASE WHEN $3 > 0 THEN now() + make_interval(secs => $3) END
        WHERE id = $1
        """,
        claim.build_id,
        f"attempt {claim.attempt}: {reason}",
        delay,
    )
    await conn.execute("SELECT pg_notify($1, 'recovered')", channels.BUILDS)
    return AttemptOver(True, stale)


async def _give_up(conn: asyncpg.Connection, claim: Claim, line: str) -> None:
    """End the build `failed` with `line` last in its output: in the job that was running, or
    the first that had not started; the jobs after it end `failed` without running."""
    jobs = await conn.fetch(
        """
        SELECT j.id, j.status FROM build_jobs j JOIN build_stages s ON s.id = j.stage_id
        WHERE j.build_id = $1 AND j.status IN ('queued', 'running')
        ORDER BY s.position, j.position
        """,
        claim.build_id,
    )
    untouched = await conn.fetchval(
        """
        SELECT b.retry_reason FROM builds b WHERE b.id = $1
           AND NOT EXISTS (SELECT 1 FROM build_jobs j WHERE j.build_id = b.id
                           AND j.status <> 'queued')
        """,
        claim.build_id,
    )
    for index, job in enumerate(jobs):
        if index == 0:
            if job["status"] == "queued":
                await job_started(conn, claim, job["id"])
            if untouched:  # nothing of this attempt ran: its output opens as it would have
                await _say(conn, claim, job["id"], attempt_notice(claim.attempt, untouched))
            await _say(conn, claim, job["id"], line)
        await job_finished(conn, claim, job["id"], "failed", ran=index == 0)
    await build_finished(conn, claim, "failed")


async def _say(conn: asyncpg.Connection, claim: Claim, job_id: int, line: str) -> None:
    """Append one of marid's own lines to the job's live output, on a line of its own."""
    last = await conn.fetchrow(
        """
        SELECT byte_offset + octet_length(text) AS end, right(text, 1) AS tail
        FROM build_job_output WHERE job_id = $1 AND attempt = $2
        ORDER BY byte_offset DESC LIMIT 1
        """,
        job_id,
        claim.attempt,
    )
    if last is None:
        await append_output(conn, claim, job_id, 0, line + "\n")
    else:
        text = ("" if last["tail"] == "\n" else "\n") + line + "\n"
        await append_output(conn, claim, job_id, last["end"], text)


async def _reset(conn: asyncpg.Connection, build_id: int, owner_id: int) -> list[str]:
    """Put a build back in the queue as if it had never run, tagged `orphaned`; returns its
    stale blob keys. The jobs a resumed build reuses keep their status. `attempt` stays, so
    the next claim takes a new one."""
    await conn.execute(
        """
        UPDATE builds SET status = 'queued', started_at = NULL, finished_at = NULL,
            output = NULL, runner = NULL, lease_expires_at = NULL
        WHERE id = $1
        """,
        build_id,
    )
    outputs = await conn.fetch(
        """
        UPDATE build_jobs j SET status = 'queued', output = NULL, started_at = NULL,
            finished_at = NULL, output_blob_key = NULL, output_size = NULL,
            output_printed = NULL, output_head = NULL, output_tail = NULL
        FROM build_jobs old
        WHERE old.id = j.id AND j.build_id = $1 AND NOT j.reused  -- those never run
        RETURNING j.id, old.output_blob_key
        """,
        build_id,
    )
    await _notify_jobs(conn, [row["id"] for row in outputs])
    await conn.execute(
        "DELETE FROM build_job_output o USING build_jobs j"
        " WHERE o.job_id = j.id AND j.build_id = $1",
        build_id,
    )
    await conn.execute("UPDATE build_objects SET placed = false WHERE build_id = $1", build_id)
    stale = await conn.fetch(
        """
        WITH old AS (
            SELECT id, blob_key FROM build_artifacts
            WHERE build_id = $1 AND blob_key IS NOT NULL FOR UPDATE
        )
        UPDATE build_artifacts a SET blob_key = NULL, size = NULL, md5 = NULL, sha256 = NULL
        FROM old WHERE a.id = old.id
        RETURNING old.blob_key
        """,
        build_id,
    )
    await conn.execute(
        """
        INSERT INTO build_tags (build_id, name, user_id) VALUES ($1, 'orphaned', $2)
        ON CONFLICT DO NOTHING
        """,
        build_id,
        owner_id,
    )
    return [row["blob_key"] for row in stale] + [
        row["output_blob_key"] for row in outputs if row["output_blob_key"]
    ]
