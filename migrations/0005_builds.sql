-- Why: builds, their snapshot and their execution state (docs/api.md §7, docs/manifest.md §5–§6), with
-- PostgreSQL as the queue: runners claim builds with FOR UPDATE SKIP LOCKED and hold a lease
-- they renew; every runner write is fenced by the attempt number it claimed.

CREATE TABLE build_counters (
    user_id bigint PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    last_number integer NOT NULL
);

CREATE TABLE builds (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    author_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    namespace_id bigint REFERENCES namespaces (id) ON DELETE SET NULL,
    number integer NOT NULL,
    manifest text NOT NULL,
    driver text NOT NULL,
    status text NOT NULL DEFAULT 'queued' CONSTRAINT builds_status_check CHECK (status IN
        ('queued', 'running', 'passed', 'passed_with_failures', 'failed', 'killed', 'timed_out')),
    output text,
    pinned boolean NOT NULL DEFAULT false,
    trigger_type text NOT NULL DEFAULT 'manual',
    trigger_comment text NOT NULL DEFAULT '',
    trigger_data jsonb NOT NULL DEFAULT '{}',
    timeout_seconds double precision NOT NULL,
    resources jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    -- Queue state: which attempt holds the build, until when, and whether a kill was asked.
    attempt integer NOT NULL DEFAULT 0,
    runner text,
    lease_expires_at timestamptz,
    kill_requested boolean NOT NULL DEFAULT false,
    CONSTRAINT builds_user_id_number_key UNIQUE (user_id, number)
);
CREATE INDEX builds_queue_idx ON builds (created_at, id) WHERE status = 'queued';
CREATE INDEX builds_running_lease_idx ON builds (lease_expires_at) WHERE status = 'running';
CREATE INDEX builds_namespace_id_idx ON builds (namespace_id, created_at DESC);
CREATE INDEX builds_user_id_created_at_idx ON builds (user_id, created_at DESC);

CREATE TABLE build_tags (
    build_id bigint NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    name text NOT NULL,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (build_id, name)
);
CREATE INDEX build_tags_name_idx ON build_tags (name);

CREATE TABLE build_stages (
    id bigserial PRIMARY KEY,
    build_id bigint NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    name text NOT NULL,
    allow_failures boolean NOT NULL DEFAULT false,
    position integer NOT NULL,
    CONSTRAINT build_stages_build_id_position_key UNIQUE (build_id, position)
);

CREATE TABLE build_jobs (
    id bigserial PRIMARY KEY,
    build_id bigint NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    stage_id bigint NOT NULL REFERENCES build_stages (id) ON DELETE CASCADE,
    name text NOT NULL,
    commands text NOT NULL DEFAULT '',
    position integer NOT NULL,
    timeout_seconds double precision,
    artifacts jsonb NOT NULL DEFAULT '[]',  -- [[source, name], ...] collected after the job
    status text NOT NULL DEFAULT 'queued' CONSTRAINT build_jobs_status_check CHECK (status IN
        ('queued', 'running', 'passed', 'passed_with_failures', 'failed', 'killed', 'timed_out')),
    output text,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    CONSTRAINT build_jobs_build_id_name_key UNIQUE (build_id, name)
);
CREATE INDEX build_jobs_build_id_position_idx ON build_jobs (build_id, position);

-- Live output: masked text appended in chunks while a job runs (docs/api.md §19). `attempt`
-- fences a dead runner's late writes; `byte_offset` counts UTF-8 bytes of the job's output.
CREATE TABLE build_job_output (
    job_id bigint NOT NULL REFERENCES build_jobs (id) ON DELETE CASCADE,
    attempt integer NOT NULL,
    byte_offset bigint NOT NULL,
    text text NOT NULL,
    PRIMARY KEY (job_id, attempt, byte_offset)
);

CREATE TABLE build_variables (
    id bigserial PRIMARY KEY,
    build_id bigint NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    variable_id bigint REFERENCES variables (id) ON DELETE SET NULL,
    key text NOT NULL,
    value text,                -- NULL when masked
    value_sealed bytea,        -- a masked value as sealed by marid/variables.py (owner, key)
    masked boolean NOT NULL DEFAULT false,
    position integer NOT NULL
);
CREATE INDEX build_variables_build_id_idx ON build_variables (build_id);

CREATE TABLE build_keys (
    id bigserial PRIMARY KEY,
    build_id bigint NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    key_id bigint REFERENCES ssh_keys (id) ON DELETE SET NULL,
    name text NOT NULL,
    key_sealed bytea NOT NULL,  -- as sealed by marid/keys.py (owner, name)
    config text NOT NULL DEFAULT '',
    location text NOT NULL
);
CREATE INDEX build_keys_build_id_idx ON build_keys (build_id);

CREATE TABLE build_objects (
    id bigserial PRIMARY KEY,
    build_id bigint NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    object_id bigint REFERENCES objects (id) ON DELETE SET NULL,
    source text NOT NULL,
    name text NOT NULL,
    placed boolean NOT NULL DEFAULT false
);
CREATE INDEX build_objects_build_id_idx ON build_objects (build_id);
CREATE INDEX build_objects_object_id_idx ON build_objects (object_id);

CREATE TABLE build_artifacts (
    id bigserial PRIMARY KEY,
    build_id bigint NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    job_id bigint NOT NULL REFERENCES build_jobs (id) ON DELETE CASCADE,
    source text NOT NULL,
    name text NOT NULL,
    blob_key text,
    size bigint,
    md5 text,
    sha256 text,
    created_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz,
    CONSTRAINT build_artifacts_build_id_name_key UNIQUE (build_id, name)
);

-- docs/api.md §22: a 201 outcome of POST /builds kept for 24 h per (user, key).
CREATE TABLE idempotency_keys (
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key text NOT NULL,
    request_sha256 text NOT NULL,
    status integer,            -- NULL while the first request is still being processed
    body bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

-- A build as the API shows it: its columns plus its tags in byte order (docs/api.md §7.1).
CREATE VIEW build_rows AS
    SELECT b.id, b.user_id, b.author_id, b.namespace_id, b.number, b.manifest, b.driver,
           b.status, b.output, b.pinned, b.trigger_type, b.trigger_comment, b.trigger_data,
           b.created_at, b.started_at, b.finished_at,
           coalesce((SELECT array_agg(t.name ORDER BY convert_to(t.name, 'UTF8'))
                     FROM build_tags t WHERE t.build_id = b.id), '{}') AS tags
    FROM builds b;

-- The build filters of docs/api.md §1.8, in one place for every build listing. NULL = no filter.
CREATE FUNCTION build_matches(b build_rows, tag text, search text, status text, pinned boolean)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT (tag IS NULL OR tag = ANY(b.tags))
       AND (search IS NULL OR EXISTS (SELECT 1 FROM unnest(b.tags) AS t(name)
                                      WHERE strpos(lower(t.name), lower(search)) > 0))
       AND (status IS NULL OR b.status = status
            OR (status = 'passed' AND b.status = 'passed_with_failures'))
       AND (NOT pinned OR b.pinned)
$$;
