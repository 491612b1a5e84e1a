-- Why: the reaper (marid/reaper.py, docs/architecture.md §6.1) deletes a blob only when no
-- row references its key, and asks that for every batch of blobs older than its grace
-- period, i.e. for nearly every blob, each sweep. Without an index each batch reads these
-- tables whole. A new column holding blob keys must be named `blob_key` or `…_blob_key`
-- (the reaper finds them by name) and should get an index like these.

CREATE INDEX objects_blob_key_idx ON objects (blob_key);
CREATE INDEX images_blob_key_idx ON images (blob_key) WHERE blob_key IS NOT NULL;
CREATE INDEX build_artifacts_blob_key_idx ON build_artifacts (blob_key)
    WHERE blob_key IS NOT NULL;
