-- Why: GET /metrics (EXTENSIONS.md f) reports installation-wide counters, whichever process
-- did the work. Most are counted from the rows themselves (builds, jobs); webhook delivery
-- attempts are deleted after 30 days (API.md §10.7), so their counter is kept here, bumped in
-- the transaction that records each attempt, and never goes down.

CREATE TABLE metric_counters (
    name text NOT NULL,
    label text NOT NULL,
    value bigint NOT NULL,
    CONSTRAINT metric_counters_pkey PRIMARY KEY (name, label)
);
