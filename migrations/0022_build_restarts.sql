-- Why: restarting a build (issue 14 item 1, docs/api.md §27): POST /b/:username/:number/restart
-- makes a new build of the same owner from the original's stored plan and snapshot (manifest,
-- stages, jobs, variables, keys, objects as frozen at the original's submission). The new
-- build links the original, which the Build entity shows as `restarted_from`; the view gains
-- the original's number, appended, as a view may only grow. The original keeps its builds
-- row whatever happens to the restart; deleting it (with its owner) unlinks the restart.

ALTER TABLE builds ADD COLUMN restart_of bigint REFERENCES builds (id) ON DELETE SET NULL;

CREATE OR REPLACE VIEW build_rows AS
    SELECT b.id, b.user_id, b.author_id, b.namespace_id, b.number, b.manifest, b.driver,
           b.status, b.output, b.pinned, b.trigger_type, b.trigger_comment, b.trigger_data,
           b.created_at, b.started_at, b.finished_at,
           coalesce((SELECT array_agg(t.name ORDER BY convert_to(t.name, 'UTF8'))
                     FROM build_tags t WHERE t.build_id = b.id), '{}') AS tags,
           b.attempt AS attempts,
           (SELECT o.number FROM builds o WHERE o.id = b.restart_of) AS restart_of
    FROM builds b;
