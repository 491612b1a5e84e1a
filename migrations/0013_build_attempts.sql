-- Why: every claimed build ends (issue 10, docs/manifest.md §6.13). An attempt that fails
-- outside the user's commands (blob store, engine, database, a value that does not decrypt),
-- or whose runner loses its lease, is retried as a new attempt up to runner.max_attempts;
-- after the last one the build ends `failed`.
--
-- `retry_at`: a retried build is queued again but not claimed before this time (backoff).
-- `retry_reason`: why the previous attempt ended (`attempt 1: runner lost its lease`); the
-- next attempt's output begins with it. The Build entity shows `attempt` as `attempts`
-- (docs/api.md §7.1), so build_rows gains it as its last column.

ALTER TABLE builds ADD COLUMN retry_at timestamptz, ADD COLUMN retry_reason text;

CREATE OR REPLACE VIEW build_rows AS
    SELECT b.id, b.user_id, b.author_id, b.namespace_id, b.number, b.manifest, b.driver,
           b.status, b.output, b.pinned, b.trigger_type, b.trigger_comment, b.trigger_data,
           b.created_at, b.started_at, b.finished_at,
           coalesce((SELECT array_agg(t.name ORDER BY convert_to(t.name, 'UTF8'))
                     FROM build_tags t WHERE t.build_id = b.id), '{}') AS tags,
           b.attempt AS attempts
    FROM builds b;
