-- Why: issue 14 item 4, caches that work across runners. A manifest's `cache:` names workspace
-- paths (docs/manifest.md §10); a build that passes saves them as one tar in the blob store, and
-- the next build of the same scope restores them before its first job. The scope is the
-- namespace, or the owner for builds without one: one namespace never reads another's cache.
--
-- `build_caches` is the build's snapshot of its manifest's `cache:` (compile once: runners never
-- re-parse YAML), scope included, so a namespace deleted after submission takes the build's
-- cache with it instead of falling back to the owner's personal caches.
--
-- `caches` holds one entry per (scope, key). A save writes the new blob first, then swaps the
-- row in one transaction under an advisory lock on the scope (marid/caches.py `store`), then
-- deletes the old blob: readers see the old entry or the new one, never half of one. The blob
-- column is named `blob_key` so that the API's reaper counts it as a reference (0012).

CREATE TABLE build_caches (
    build_id bigint PRIMARY KEY REFERENCES builds (id) ON DELETE CASCADE,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,  -- the build's owner
    namespace_id bigint REFERENCES namespaces (id) ON DELETE CASCADE,  -- NULL: the owner's
    key text NOT NULL,
    paths text[] NOT NULL
);

CREATE TABLE caches (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,  -- owner of the scope
    namespace_id bigint REFERENCES namespaces (id) ON DELETE CASCADE,  -- NULL: the owner's own
    key text NOT NULL,
    paths text[] NOT NULL,
    blob_key text NOT NULL,
    size bigint NOT NULL CONSTRAINT caches_size_check CHECK (size >= 0),
    build_id bigint REFERENCES builds (id) ON DELETE SET NULL,  -- the build that saved it
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz NOT NULL DEFAULT now()  -- saved or restored: the LRU order
);

CREATE UNIQUE INDEX caches_namespace_key ON caches (namespace_id, key)
    WHERE namespace_id IS NOT NULL;
CREATE UNIQUE INDEX caches_user_key ON caches (user_id, key) WHERE namespace_id IS NULL;
CREATE INDEX caches_blob_key_idx ON caches (blob_key);
