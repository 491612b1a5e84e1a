-- Why: objects (files placed into builds, docs/api.md §14) and images (qemu disks and docker image
-- archives, §12 and docs/manifest.md §9.2) keep their content in the blob store under `blob_key`.
-- Image downloads (§12.3) run in the API process and record their progress here, so a
-- restarted server can resume or fail the ones it left pending.

CREATE TABLE objects (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    author_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- SET NULL is a backstop: the trigger below detaches objects first.
    namespace_id bigint REFERENCES namespaces (id) ON DELETE SET NULL,
    detached boolean NOT NULL DEFAULT false,
    name text NOT NULL,
    type text NOT NULL,
    size bigint NOT NULL,
    md5 text NOT NULL,
    sha256 text NOT NULL,
    blob_key text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Names are unique among the owner's un-namespaced objects and within a namespace; objects
-- detached from a deleted namespace keep their names without blocking new ones.
CREATE UNIQUE INDEX objects_user_id_name_key ON objects (user_id, name)
    WHERE namespace_id IS NULL AND NOT detached;
CREATE UNIQUE INDEX objects_namespace_id_name_key ON objects (namespace_id, name)
    WHERE namespace_id IS NOT NULL;
CREATE INDEX objects_user_id_idx ON objects (user_id);

CREATE FUNCTION objects_detach() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE objects SET namespace_id = NULL, detached = true WHERE namespace_id = OLD.id;
    RETURN OLD;
END;
$$;
-- Deleting a namespace keeps its objects, detached (docs/api.md §8.6); a cascaded delete of a
-- child namespace fires this too.
CREATE TRIGGER objects_detach BEFORE DELETE ON namespaces
    FOR EACH ROW EXECUTE FUNCTION objects_detach();

CREATE TABLE images (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    author_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    namespace_id bigint REFERENCES namespaces (id) ON DELETE SET NULL,
    detached boolean NOT NULL DEFAULT false,
    driver text NOT NULL CONSTRAINT images_driver_check CHECK (driver IN ('qemu', 'docker')),
    name text NOT NULL,
    -- The content: NULL until a download has finished (never NULL for an upload).
    blob_key text,
    size bigint,
    sha256 text,  -- the runner caches loaded docker archives by it (docs/manifest.md §9.2)
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX images_user_id_name_key ON images (user_id, name)
    WHERE namespace_id IS NULL AND NOT detached;
CREATE UNIQUE INDEX images_namespace_id_name_key ON images (namespace_id, name)
    WHERE namespace_id IS NOT NULL;
CREATE INDEX images_user_id_idx ON images (user_id);

CREATE FUNCTION images_detach() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE images SET namespace_id = NULL, detached = true WHERE namespace_id = OLD.id;
    RETURN OLD;
END;
$$;
CREATE TRIGGER images_detach BEFORE DELETE ON namespaces
    FOR EACH ROW EXECUTE FUNCTION images_detach();

CREATE TABLE image_downloads (
    image_id bigint PRIMARY KEY REFERENCES images (id) ON DELETE CASCADE,
    -- The URL as shown (docs/api.md §12.1): any password replaced by `xxxxx`.
    source text NOT NULL,
    -- The URL itself, encrypted with crypto.key (it may hold a password); kept only until the
    -- download finishes, so a restarted server can run it again.
    secret_url bytea,
    error text,
    attempts integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz
);
CREATE INDEX image_downloads_pending_idx ON image_downloads (image_id) WHERE finished_at IS NULL;

-- Images with their download, which every Image entity embeds (docs/api.md §12.1).
CREATE VIEW images_with_download AS
    SELECT i.id, i.user_id, i.author_id, i.namespace_id, i.detached, i.driver, i.name,
           i.blob_key, i.size, i.sha256, i.created_at,
           d.source AS download_source, d.error AS download_error,
           d.created_at AS download_created_at, d.started_at AS download_started_at,
           d.finished_at AS download_finished_at
    FROM images i LEFT JOIN image_downloads d ON d.image_id = i.id;
