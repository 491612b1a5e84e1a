-- Why: users and their access tokens are what every request is authenticated against
-- (docs/api.md §6, docs/api.md §18). Tokens are stored only as SHA-256 digests.

CREATE TABLE users (
    id bigserial PRIMARY KEY,
    username text NOT NULL CONSTRAINT users_username_key UNIQUE,
    email text NOT NULL CONSTRAINT users_email_key UNIQUE,
    password_hash text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tokens (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name text NOT NULL,
    scope text NOT NULL,
    digest text NOT NULL CONSTRAINT tokens_digest_key UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    CONSTRAINT tokens_user_id_name_key UNIQUE (user_id, name)
);
