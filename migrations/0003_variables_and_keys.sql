-- Why: variables and SSH keys are stored per user or per namespace and placed into builds
-- (docs/api.md §13, §15; docs/manifest.md §5.5). Secrets never sit in plain text: a masked value and a
-- private key are kept only as AES-GCM blobs (marid/crypto.py); the CHECK on variables makes
-- a plain-text masked value impossible to store.

CREATE TABLE variables (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    author_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- SET NULL is a backstop: the trigger below detaches variables first.
    namespace_id bigint REFERENCES namespaces (id) ON DELETE SET NULL,
    detached boolean NOT NULL DEFAULT false,
    key text NOT NULL,
    masked boolean NOT NULL,
    value text,          -- unmasked values only
    value_sealed bytea,  -- masked values only, bound to (user_id, key): marid/variables.py
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT variables_value_check CHECK (
        CASE WHEN masked THEN value IS NULL AND value_sealed IS NOT NULL
             ELSE value IS NOT NULL AND value_sealed IS NULL END
    ),
    CONSTRAINT variables_detached_check CHECK (NOT detached OR namespace_id IS NULL)
);
-- Keys are unique among the owner's un-namespaced variables and within a namespace; those
-- detached from a deleted namespace keep their keys without blocking new ones.
CREATE UNIQUE INDEX variables_user_id_key_key ON variables (user_id, key)
    WHERE namespace_id IS NULL AND NOT detached;
CREATE UNIQUE INDEX variables_namespace_id_key_key ON variables (namespace_id, key)
    WHERE namespace_id IS NOT NULL;
CREATE INDEX variables_user_id_idx ON variables (user_id);

CREATE FUNCTION variables_detach() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE variables SET namespace_id = NULL, detached = true WHERE namespace_id = OLD.id;
    RETURN OLD;
END;
$$;
-- Deleting a namespace keeps its variables, detached (docs/api.md §8.6); a cascaded delete of a
-- child namespace fires this too.
CREATE TRIGGER variables_detach BEFORE DELETE ON namespaces
    FOR EACH ROW EXECUTE FUNCTION variables_detach();

CREATE TABLE ssh_keys (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    author_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    namespace_id bigint REFERENCES namespaces (id) ON DELETE SET NULL,
    detached boolean NOT NULL DEFAULT false,
    name text NOT NULL,
    key_sealed bytea NOT NULL,  -- the private key, bound to (user_id, name): marid/keys.py
    config text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ssh_keys_detached_check CHECK (NOT detached OR namespace_id IS NULL)
);
CREATE UNIQUE INDEX ssh_keys_user_id_name_key ON ssh_keys (user_id, name)
    WHERE namespace_id IS NULL AND NOT detached;
CREATE UNIQUE INDEX ssh_keys_namespace_id_name_key ON ssh_keys (namespace_id, name)
    WHERE namespace_id IS NOT NULL;
CREATE INDEX ssh_keys_user_id_idx ON ssh_keys (user_id);

CREATE FUNCTION ssh_keys_detach() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ssh_keys SET namespace_id = NULL, detached = true WHERE namespace_id = OLD.id;
    RETURN OLD;
END;
$$;
CREATE TRIGGER ssh_keys_detach BEFORE DELETE ON namespaces
    FOR EACH ROW EXECUTE FUNCTION ssh_keys_detach();
