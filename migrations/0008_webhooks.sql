-- Why: webhooks (docs/api.md §10) tell other systems what happened in a namespace. An event
-- is queued as webhook_deliveries rows in the transaction of the change that caused it (an
-- outbox: no event for a rolled-back change, none lost when the process dies after commit), and
-- `marid scheduler` sends them in the background, retrying with backoff when the receiver cannot
-- be reached. Each delivery carries its own target and sealed secret, so the `namespaces` event
-- for a deleted namespace still reaches that namespace's webhooks after they are gone; deleting
-- a webhook through the API deletes its deliveries and attempts explicitly (§10.5). Every
-- attempt is kept in webhook_attempts for 30 days (§10.7) and listed by
-- GET N/-/webhooks/:id/deliveries (an extension).

CREATE TABLE webhooks (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    author_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    namespace_id bigint NOT NULL REFERENCES namespaces (id) ON DELETE CASCADE,
    payload_url text NOT NULL,
    -- AES-GCM (marid/crypto.py) bound to the webhook id; NULL when there is no secret.
    secret_sealed bytea,
    ssl boolean NOT NULL,
    active boolean NOT NULL,
    events text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhooks_namespace_id_payload_url_key UNIQUE (namespace_id, payload_url)
);

CREATE TABLE webhook_deliveries (
    id bigserial PRIMARY KEY,
    webhook_id bigint NOT NULL,  -- no foreign key: see above
    payload_url text NOT NULL,
    secret_sealed bytea,
    event text NOT NULL,
    body bytea NOT NULL,  -- the exact bytes sent and signed, the same on every attempt
    attempts integer NOT NULL DEFAULT 0,
    state text NOT NULL DEFAULT 'pending'
        CONSTRAINT webhook_deliveries_state_check CHECK (state IN ('pending', 'delivered', 'failed')),
    -- When the next attempt is due; while one is in flight, when its claim expires.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at, id)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_webhook_id_idx ON webhook_deliveries (webhook_id);
CREATE INDEX webhook_deliveries_created_at_idx ON webhook_deliveries (created_at)
    WHERE state <> 'pending';

CREATE TABLE webhook_attempts (
    id bigserial PRIMARY KEY,
    delivery_id bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    webhook_id bigint NOT NULL,
    event text NOT NULL,
    attempt integer NOT NULL,  -- 1 for the first attempt of its delivery
    code integer,  -- NULL when no response was received
    duration bigint NOT NULL,  -- nanoseconds
    error text,  -- NULL when a response was received
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_attempts_webhook_id_idx ON webhook_attempts (webhook_id, id DESC);
CREATE INDEX webhook_attempts_delivery_id_idx ON webhook_attempts (delivery_id);
CREATE INDEX webhook_attempts_created_at_idx ON webhook_attempts (created_at);
