-- Why: issue 15. A `marid runner` held a database DSN and `crypto.key`, so every build host could
-- read every user's secrets and rewrite any row. Runners on other machines now talk HTTP
-- (docs/runners.md): an administrator makes an enrolment token; a runner registers with it
-- and gets a runner token for its session; each claim hands it a job token for that build's
-- attempt alone. Only SHA-256 digests of the three are stored.

-- Enrolment tokens (`marid runner-token create`, POST /runner-tokens): any number of runners
-- may register with one until it is revoked (its row deleted) or it expires.
CREATE TABLE runner_enrolments (
    id bigserial PRIMARY KEY,
    name text NOT NULL CONSTRAINT runner_enrolments_name_check
        CHECK (length(name) BETWEEN 1 AND 255),
    token_digest text NOT NULL UNIQUE,
    created_by bigint REFERENCES users (id) ON DELETE SET NULL,  -- NULL: the command line
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,                                       -- NULL: never
    last_used_at timestamptz
);

-- A registered (remote) runner is a row of `runners` with a token: its presence is announced
-- by the API on each of its heartbeats, so the pending reasons and the claim's rules see it
-- as they see a runner in the database's reach. In-process runners have no token.
ALTER TABLE runners
    ADD COLUMN id bigserial UNIQUE,
    ADD COLUMN token_digest text UNIQUE,
    ADD COLUMN enrolment_id bigint REFERENCES runner_enrolments (id) ON DELETE SET NULL,
    ADD COLUMN labels text[] NOT NULL DEFAULT '{}',
    ADD COLUMN address text,  -- the client address of its last request (remote runners)
    -- Revoked (DELETE /runners/{id}): its token is refused, its builds were handed back, and
    -- it no longer counts as alive; the row stays to be listed until it is forgotten.
    ADD COLUMN revoked_at timestamptz;

CREATE OR REPLACE FUNCTION runner_alive(r runners) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT r.revoked_at IS NULL
       AND r.last_seen_at > now() - make_interval(secs => 3 * r.announce_interval)
$$;

-- The job token of the attempt that holds a running build (its digest): every write of a
-- remote runner names the build and carries this token, and is refused once the attempt ended
-- (the fence of migrations/0011) or another took the build.
ALTER TABLE builds ADD COLUMN job_token_digest text;
CREATE UNIQUE INDEX builds_job_token_digest ON builds (job_token_digest)
    WHERE job_token_digest IS NOT NULL;
