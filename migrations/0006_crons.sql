-- Why: cron jobs submit builds on a schedule (docs/api.md §11, docs/api.md §17). Each run is recorded
-- in cron_runs under a unique (cron_id, scheduled_at), so a scheduled run produces at most one
-- build even when several schedulers race or one dies mid-batch: the constraint, not only the
-- row locks, is the exactly-once guarantee. Cron jobs go with their namespace (§8.6);
-- the builds they created are kept.

CREATE TABLE crons (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    author_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    namespace_id bigint REFERENCES namespaces (id) ON DELETE CASCADE,
    name text NOT NULL,
    schedule text NOT NULL,
    timezone text NOT NULL DEFAULT 'UTC',
    manifest text NOT NULL,
    prev_run timestamptz,
    next_run timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Names are unique among the owner's un-namespaced cron jobs and within a namespace.
CREATE UNIQUE INDEX crons_user_id_name_key ON crons (user_id, name) WHERE namespace_id IS NULL;
CREATE UNIQUE INDEX crons_namespace_id_name_key ON crons (namespace_id, name)
    WHERE namespace_id IS NOT NULL;
CREATE INDEX crons_user_id_idx ON crons (user_id);
-- The scheduler's claim: due cron jobs in next_run order.
CREATE INDEX crons_next_run_idx ON crons (next_run, id);

ALTER TABLE builds ADD COLUMN cron_id bigint REFERENCES crons (id) ON DELETE SET NULL;
CREATE INDEX builds_cron_id_idx ON builds (cron_id, created_at DESC) WHERE cron_id IS NOT NULL;

CREATE TABLE cron_runs (
    cron_id bigint NOT NULL REFERENCES crons (id) ON DELETE CASCADE,
    scheduled_at timestamptz NOT NULL,
    -- NULL when the build could not be created (§11.2); SET NULL keeps the run when it goes.
    build_id bigint REFERENCES builds (id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT cron_runs_cron_id_scheduled_at_key UNIQUE (cron_id, scheduled_at)
);
CREATE INDEX cron_runs_build_id_idx ON cron_runs (build_id) WHERE build_id IS NOT NULL;
