-- Why: concurrency limits and the reasons a queued build waits (issue 14 items 2 and 3,
-- docs/api.md §7.1 Pending, §8.1 `max_running`).
--
-- A namespace may cap how many of its builds run at once (`namespaces.max_running`), and the
-- configuration may cap how many builds of one author run at once (`builds.max_running_per_user`,
-- passed in by the claiming runner as `author_limit`). Both are enforced here, at the claim,
-- so that any number of runners on any number of hosts respect them.
--
-- `build_holds` says, for every queued build, what holds it back, if anything: its retry time
-- after a failed attempt, an image still being downloaded (docs/api.md §12.3), its namespace's
-- limit or its author's. The claim takes only builds held by nothing, and the API shows the
-- same answer as the build's `pending` reason, so the two never disagree.
--
-- Counting running builds and claiming one are not atomic by themselves: two runners could
-- both count one running build under a limit of two and both claim. So a claim of a limited
-- build takes one transaction-scoped advisory lock (CLAIM_LOCK below) and looks again: claims
-- of limited builds are serialised, each seeing the builds claimed before it committed. The
-- lock is held for the claim's short transaction only (about a millisecond); a claim of a build
-- that no limit applies to never takes it. One lock for every limit, rather than one per
-- namespace, since a claimer that held one namespace's lock while waiting for another's could
-- deadlock with a claimer doing the opposite.

ALTER TABLE namespaces ADD COLUMN max_running integer
    CONSTRAINT namespaces_max_running_check CHECK (max_running BETWEEN 1 AND 10000);

CREATE INDEX builds_running_namespace_idx ON builds (namespace_id) WHERE status = 'running';
CREATE INDEX builds_running_author_idx ON builds (author_id) WHERE status = 'running';

-- What holds back each queued build (NULL: nothing, a runner may take it), and a detail for
-- its pending reason: the limit, the image's name or the retry time.
CREATE FUNCTION build_holds(author_limit integer)
RETURNS TABLE (build_id bigint, hold text, detail text) LANGUAGE sql STABLE AS $$
    WITH queued AS (
        SELECT b.id, b.user_id, b.namespace_id, b.author_id, b.driver, b.retry_at,
               b.driver_config ->> 'image' AS image, n.max_running
        FROM builds b LEFT JOIN namespaces n ON n.id = b.namespace_id
        WHERE b.status = 'queued'
    ), by_namespace AS (
        SELECT r.namespace_id, count(*) AS running FROM builds r
        WHERE r.status = 'running'
          AND r.namespace_id IN (SELECT q.namespace_id FROM queued q WHERE q.max_running IS NOT NULL)
        GROUP BY r.namespace_id
    ), by_author AS (
        SELECT r.author_id, count(*) AS running FROM builds r
        WHERE r.status = 'running' AND author_limit IS NOT NULL
        GROUP BY r.author_id
    )
    SELECT q.id,
           CASE WHEN q.retry_at > now() THEN 'retry'
                WHEN q.image IS NOT NULL AND EXISTS (
                    SELECT 1 FROM images i JOIN image_downloads d ON d.image_id = i.id
                    WHERE i.driver = q.driver AND i.name = q.image AND i.blob_key IS NULL
                      AND d.error IS NULL
                      AND CASE WHEN q.namespace_id IS NULL
                          THEN i.namespace_id IS NULL AND NOT i.detached AND i.user_id = q.user_id
                          ELSE i.namespace_id = q.namespace_id END) THEN 'image'
                WHEN coalesce(ns.running, 0) >= q.max_running THEN 'namespace'
                WHEN coalesce(au.running, 0) >= author_limit THEN 'user'
           END,
           CASE WHEN q.retry_at > now()
                THEN to_char(q.retry_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                WHEN coalesce(ns.running, 0) >= q.max_running THEN q.max_running::text
                WHEN coalesce(au.running, 0) >= author_limit THEN author_limit::text
                ELSE q.image
           END
    FROM queued q
    LEFT JOIN by_namespace ns ON ns.namespace_id = q.namespace_id
    LEFT JOIN by_author au ON au.author_id = q.author_id
$$;

-- Claim the oldest queued build of `claimable` drivers that nothing holds back: `running`,
-- its next attempt, leased for `lease` seconds to `claimer` (marid/lifecycle.py `claim`).
-- Returns no row when there is none.
CREATE FUNCTION claim_build(claimer text, claimable text[], lease double precision,
                            author_limit integer)
RETURNS TABLE (claimed_id bigint, claimed_attempt integer) LANGUAGE plpgsql AS $$
DECLARE
    candidate record;
    serialised boolean := false;
BEGIN
    LOOP
        SELECT b.id, (n.max_running IS NOT NULL OR author_limit IS NOT NULL) AS limited
        INTO candidate
        FROM builds b
        JOIN build_holds(author_limit) h ON h.build_id = b.id
        LEFT JOIN namespaces n ON n.id = b.namespace_id
        WHERE b.status = 'queued' AND b.driver = ANY(claimable) AND h.hold IS NULL
        ORDER BY b.created_at, b.id
        LIMIT 1
        FOR UPDATE OF b SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF candidate.limited AND NOT serialised THEN
            -- CLAIM_LOCK: (1835102569, 20) = ('marid' as a number, this migration's number).
            -- Then look again: this statement's snapshot sees every limited claim committed
            -- before the lock was granted. The candidate stays locked by this transaction,
            -- which SKIP LOCKED does not skip.
            PERFORM pg_advisory_xact_lock(1835102569, 20);
            serialised := true;
            CONTINUE;
        END IF;
        -- started_at: the moment of the claim, not of its transaction's start (the queue's
        -- pickup latency is read from it, bench/pickup.py).
        RETURN QUERY
            UPDATE builds
            SET status = 'running', started_at = clock_timestamp(), attempt = attempt + 1,
                runner = claimer, lease_expires_at = now() + make_interval(secs => lease), retry_at = NULL
            WHERE id = candidate.id
            RETURNING id, attempt;
        RETURN;
    END LOOP;
END
$$;

-- A build leaving `running` may free a limit's slot for a queued build that another runner
-- (perhaps the only one of its driver) would take: wake the runners when any build is queued.
-- NOTIFY is sent on commit, and repeated ones in one transaction are sent once.
CREATE FUNCTION notify_slot_freed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM builds WHERE status = 'queued') THEN
        PERFORM pg_notify('marid_builds', 'freed');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER builds_slot_freed AFTER UPDATE OF status ON builds
    FOR EACH ROW WHEN (OLD.status = 'running' AND NEW.status <> 'running')
    EXECUTE FUNCTION notify_slot_freed();

-- A finished download releases the builds waiting for its image; a raised or removed limit
-- releases a namespace's builds.
CREATE FUNCTION notify_builds_released() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('marid_builds', 'released');
    RETURN NULL;
END
$$;

CREATE TRIGGER image_downloads_released AFTER UPDATE OF finished_at ON image_downloads
    FOR EACH ROW WHEN (OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL)
    EXECUTE FUNCTION notify_builds_released();

CREATE TRIGGER namespaces_limit_released AFTER UPDATE OF max_running ON namespaces
    FOR EACH ROW WHEN (NEW.max_running IS NULL OR NEW.max_running > OLD.max_running)
    EXECUTE FUNCTION notify_builds_released();

-- Each runner announces the author limit it claims with, so that an API process tells the
-- `user limit` reason with no runner configuration of its own (marid/runners.py `offered`).
ALTER TABLE runners ADD COLUMN max_running_per_user integer;

-- The Namespace entity shows its limit (docs/api.md §8.1): appended, as a view may only grow.
CREATE OR REPLACE VIEW namespaces_with_owner AS
    SELECT n.id, n.user_id, n.root_id, n.parent_id, n.name, n.path, n.description,
           n.visibility, n.created_at,
           u.username AS owner_username, u.email AS owner_email,
           u.created_at AS owner_created_at,
           n.max_running
    FROM namespaces n JOIN users u ON u.id = n.user_id;
