-- Why: GET /metrics (docs/api.md §21) reports installation-wide counters, whichever process
-- did the work, counted from the rows themselves (builds, jobs, webhook attempts). Webhook
-- attempts are deleted after 30 days (docs/api.md §10.7): the purge adds what it deletes to a
-- counter here, in its own transaction, so the total never goes down (and recording an
-- attempt does not contend for a counter row).

CREATE TABLE metric_counters (
    name text NOT NULL,
    label text NOT NULL,
    value bigint NOT NULL,
    CONSTRAINT metric_counters_pkey PRIMARY KEY (name, label)
);
