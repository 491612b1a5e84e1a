-- Why: issue 11 row 13. A live output stream (docs/api.md §19) kept streaming after its reader
-- lost access, and every stream polled the database each second. Streams now wake only on
-- NOTIFY: `marid_output` for their job, and this channel, `marid_access` (marid/channels.py
-- ACCESS), whenever something that decides who may read a build changes, whatever the code
-- path (cascades included): a namespace's visibility, a namespace deleted, a collaborator
-- removed, a token deleted or its scope changed, a user deleted, a build deleted or detached.
-- Each API process then re-checks its streams' readers. Statement-level: one notification per
-- change, however many rows; these changes are rare next to the output they guard.

CREATE FUNCTION notify_access_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('marid_access', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER namespaces_access AFTER UPDATE OF visibility, user_id, parent_id OR DELETE
    ON namespaces FOR EACH STATEMENT EXECUTE FUNCTION notify_access_changed();
CREATE TRIGGER namespace_collaborators_access AFTER DELETE
    ON namespace_collaborators FOR EACH STATEMENT EXECUTE FUNCTION notify_access_changed();
CREATE TRIGGER tokens_access AFTER UPDATE OF scope, digest, user_id OR DELETE
    ON tokens FOR EACH STATEMENT EXECUTE FUNCTION notify_access_changed();
CREATE TRIGGER users_access AFTER DELETE
    ON users FOR EACH STATEMENT EXECUTE FUNCTION notify_access_changed();
CREATE TRIGGER builds_access AFTER UPDATE OF namespace_id, user_id OR DELETE
    ON builds FOR EACH STATEMENT EXECUTE FUNCTION notify_access_changed();
