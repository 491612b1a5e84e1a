-- Why: restarting a build (issue 14 item 1, docs/api.md §27): POST /b/:username/:number/restart
-- makes a new build of the same owner from the original's stored plan and snapshot (manifest,
-- stages, jobs, variables, keys, objects as frozen at the original's submission). The new
-- build links the original, which the Build entity shows as `restarted_from`; the view gains
-- the original's number, appended, as a view may only grow. The original keeps its builds
-- row whatever happens to the restart; deleting it (with its owner) unlinks the restart.

ALTER TABLE builds ADD COLUMN restart_of bigint REFERENCES builds (id) ON DELETE SET NULL;

CREATE OR REPLACE VIEW build_rows AS
    SELECT b.id, b.user_id, b.author_id, b.namespace_id, b.number, b.manifest, b.driver,
           b.status, b.output, b.pinned, b.trigger_type, b.trigger_comment, b.trigger_data,
           b.created_at, b.started_at, b.finished_at,
           coalesce((SELECT array_agg(t.name ORDER BY convert_to(t.name, 'UTF8'))
                     FROM build_tags t WHERE t.build_id = b.id), '{}') AS tags,
           b.attempt AS attempts,
           (SELECT o.number FROM builds o WHERE o.id = b.restart_of) AS restart_of
    FROM builds b;

-- Resuming from a job (POST …/restart with `from`): a build that ends failed, killed or timed_out
-- leaves its workspace where it ran (a docker volume, the os driver's directory) for
-- `builds.keep_workspace`, recorded here by its runner in the transaction that ends the
-- build. `place` says where it can be reached from (`docker:<engine id>`, `os:<host>`): each
-- runner announces the places it reaches (`runners.places`), a resumed build carries its
-- workspace's place (`builds.resume_place`), and only a runner reaching that place claims it.
-- Runners' reapers keep a kept workspace until it expires and no queued or running build
-- resumes from it (marid/reaper.py `live_attempts`), then remove it.
CREATE TABLE kept_workspaces (
    build_id bigint PRIMARY KEY REFERENCES builds (id) ON DELETE CASCADE,
    attempt integer NOT NULL,       -- the attempt that made it: its labels name it
    driver text NOT NULL,
    place text NOT NULL,
    location text NOT NULL,         -- the volume's name, the directory's path
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX kept_workspaces_expires_at_idx ON kept_workspaces (expires_at);

-- A resumed build: the job it resumes from (NULL: a whole restart, or a submitted build) and
-- where its original's workspace is. Its jobs before that one are `reused`: never run, each
-- showing the status of the original's job it links (`reused_from`).
ALTER TABLE builds ADD COLUMN resume_from text, ADD COLUMN resume_place text;
ALTER TABLE build_jobs ADD COLUMN reused boolean NOT NULL DEFAULT false,
    ADD COLUMN reused_from bigint REFERENCES build_jobs (id) ON DELETE SET NULL;
CREATE INDEX builds_restart_of_idx ON builds (restart_of) WHERE restart_of IS NOT NULL;

-- A kept workspace stays while it has not expired, and while a resumed build that starts from
-- it waits or runs, whose attempts copy it when they start.
CREATE FUNCTION workspace_kept(k kept_workspaces) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT k.expires_at > now() OR EXISTS (
        SELECT 1 FROM builds r
        WHERE r.restart_of = k.build_id AND r.resume_from IS NOT NULL
          AND r.status IN ('queued', 'running'))
$$;

ALTER TABLE runners ADD COLUMN places text[] NOT NULL DEFAULT '{}';

-- build_holds (migration 0020) with one more hold: a resumed build whose workspace no alive
-- runner reaches waits for one ('workspace').
CREATE OR REPLACE FUNCTION build_holds(author_limit integer)
RETURNS TABLE (build_id bigint, hold text, detail text) LANGUAGE sql STABLE AS $$
    WITH queued AS (
        SELECT b.id, b.user_id, b.namespace_id, b.author_id, b.driver, b.retry_at,
               b.driver_config ->> 'image' AS image, n.max_running, b.resume_place
        FROM builds b LEFT JOIN namespaces n ON n.id = b.namespace_id
        WHERE b.status = 'queued'
    ), by_namespace AS (
        -- Every limited namespace's running builds, not only those with queued builds: the
        -- queue is not aggregated twice (bench/README.md, the pickup bench).
        SELECT r.namespace_id, count(*) AS running
        FROM builds r JOIN namespaces n ON n.id = r.namespace_id
        WHERE r.status = 'running' AND n.max_running IS NOT NULL
        GROUP BY r.namespace_id
    ), by_author AS (
        SELECT r.author_id, count(*) AS running FROM builds r
        WHERE r.status = 'running' AND author_limit IS NOT NULL
        GROUP BY r.author_id
    )
    SELECT q.id,
           CASE WHEN q.retry_at > now() THEN 'retry'
                WHEN q.resume_place IS NOT NULL AND NOT EXISTS (
                    SELECT 1 FROM runners r
                    WHERE runner_alive(r) AND q.resume_place = ANY(r.places)) THEN 'workspace'
                WHEN q.image IS NOT NULL AND EXISTS (
                    SELECT 1 FROM images i JOIN image_downloads d ON d.image_id = i.id
                    WHERE i.driver = q.driver AND i.name = q.image AND i.blob_key IS NULL
                      AND d.error IS NULL
                      AND CASE WHEN q.namespace_id IS NULL
                          THEN i.namespace_id IS NULL AND NOT i.detached AND i.user_id = q.user_id
                          ELSE i.namespace_id = q.namespace_id END) THEN 'image'
                WHEN coalesce(ns.running, 0) >= q.max_running THEN 'namespace'
                WHEN coalesce(au.running, 0) >= author_limit THEN 'user'
           END,
           CASE WHEN q.retry_at > now()
                THEN to_char(q.retry_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                WHEN coalesce(ns.running, 0) >= q.max_running THEN q.max_running::text
                WHEN coalesce(au.running, 0) >= author_limit THEN author_limit::text
                ELSE q.image
           END
    FROM queued q
    LEFT JOIN by_namespace ns ON ns.namespace_id = q.namespace_id
    LEFT JOIN by_author au ON au.author_id = q.author_id
$$;

-- claim_build (migration 0020) told the places the claiming runner reaches: it takes a
-- resumed build only when it reaches the build's workspace.
DROP FUNCTION claim_build(text, text[], double precision, integer);
CREATE FUNCTION claim_build(claimer text, claimable text[], lease double precision,
                            author_limit integer, reachable text[])
RETURNS TABLE (claimed_id bigint, claimed_attempt integer) LANGUAGE plpgsql AS $$
DECLARE
    candidate record;
    serialised boolean := false;
BEGIN
    LOOP
        SELECT b.id, (n.max_running IS NOT NULL OR author_limit IS NOT NULL) AS limited
        INTO candidate
        FROM builds b
        JOIN build_holds(author_limit) h ON h.build_id = b.id
        LEFT JOIN namespaces n ON n.id = b.namespace_id
        WHERE b.status = 'queued' AND b.driver = ANY(claimable)
          AND (h.hold IS NULL OR h.hold = 'workspace')
          AND (b.resume_place IS NULL OR b.resume_place = ANY(reachable))
        ORDER BY b.created_at, b.id
        LIMIT 1
        FOR UPDATE OF b SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF candidate.limited AND NOT serialised THEN
            -- CLAIM_LOCK of migration 0020; then look again (see there).
            PERFORM pg_advisory_xact_lock(1835102569, 20);
            serialised := true;
            CONTINUE;
        END IF;
        -- started_at: the moment of the claim (migration 0020).
        RETURN QUERY
            UPDATE builds
            SET status = 'running', started_at = clock_timestamp(), attempt = attempt + 1,
                runner = claimer, lease_expires_at = now() + make_interval(secs => lease),
                retry_at = NULL
            WHERE id = candidate.id
            RETURNING id, attempt;
        RETURN;
    END LOOP;
END
$$;
