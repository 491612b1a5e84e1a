-- Why: one fence for every write a runner makes about its build (docs/architecture.md §3.1),
-- and the driver settings compiled at submission so that runners never re-parse the manifest.
--
-- The fence used to be copied into each runner statement as a join on `builds`
-- (`... FROM builds b WHERE b.id = $1 AND b.attempt = $2 AND b.status = 'running'`). That join
-- does not lock the build row, and when a concurrent lease recovery commits while such an
-- UPDATE waits on a job row, PostgreSQL re-checks only the job row, not `builds`: the late
-- write slipped past the recovery. `fence_build` instead locks the build row for the rest of
-- the caller's transaction. Recovery takes its rows FOR UPDATE SKIP LOCKED, so it either
-- committed before the fence (which waits for it, then sees the new row and raises) or skips
-- the build until the fenced transaction ends. The lock is FOR NO KEY UPDATE, not FOR SHARE:
-- lease renewal and the build's finish update the row they fence, and two transactions
-- upgrading a shared lock on one row deadlock. It blocks every other UPDATE of the row
-- meanwhile (a kill request waits a moment), and foreign keys to `builds` are not held up.

CREATE FUNCTION fence_build(claimed_build bigint, claimed_attempt integer) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM builds
    WHERE id = claimed_build AND attempt = claimed_attempt AND status = 'running'
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        -- SQLSTATE MF001 (marid fence) is raised as LostLease by marid/lifecycle.py.
        RAISE EXCEPTION 'build % attempt % no longer holds its lease', claimed_build,
            claimed_attempt USING ERRCODE = 'MF001';
    END IF;
END
$$;

-- The manifest's `driver` mapping, every key included (`type`, docker's `image` and
-- `workspace`), as parsed at submission. NULL for builds submitted before this migration:
-- YAML cannot be parsed here, so the runner parses those builds' manifests once, at load.
ALTER TABLE builds ADD COLUMN driver_config jsonb;
