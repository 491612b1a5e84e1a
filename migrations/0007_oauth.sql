-- Why: third-party applications (docs/api.md §23) obtain tokens through the OAuth
-- authorization-code flow (docs/api.md §16). Client secrets, codes and tokens are stored only as
-- SHA-256 digests. OAuth tokens live in `tokens` (so GET /tokens lists them) tagged with their
-- app, at most one per user and app, and die with the app.

CREATE TABLE apps (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    client_id text NOT NULL CONSTRAINT apps_client_id_key UNIQUE,
    name text NOT NULL,
    description text NOT NULL DEFAULT '',
    homepage_uri text NOT NULL,
    redirect_uri text NOT NULL,
    secret_digest text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT apps_user_id_name_key UNIQUE (user_id, name)
);

CREATE TABLE oauth_codes (
    id bigserial PRIMARY KEY,
    digest text NOT NULL CONSTRAINT oauth_codes_digest_key UNIQUE,
    app_id bigint NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    scope text NOT NULL,
    redirect_uri text NOT NULL,
    expires_at timestamptz NOT NULL,
    used boolean NOT NULL DEFAULT false
);

ALTER TABLE tokens ADD COLUMN app_id bigint REFERENCES apps (id) ON DELETE CASCADE;
-- An OAuth token is named after its app, which may clash with a personal token's name: names
-- stay unique among personal tokens only (same constraint name, so marid.tokens still maps it).
ALTER TABLE tokens DROP CONSTRAINT tokens_user_id_name_key;
CREATE UNIQUE INDEX tokens_user_id_name_key ON tokens (user_id, name) WHERE app_id IS NULL;
CREATE UNIQUE INDEX tokens_user_id_app_id_key ON tokens (user_id, app_id)
    WHERE app_id IS NOT NULL;
