-- Why: issue 12 part 3. A build whose driver no runner offers (`qemu` enabled in `drivers` but
-- no runner set up for it, or no runner at all) stayed `queued` with nothing to say why. Each
-- runner now announces itself here (marid/runners.py): its name, the driver types it claims,
-- and when it was last seen. A build's `pending` reason (docs/api.md §7.1) is read from the
-- runners that are alive.
--
-- A runner announces every `announce_interval` seconds and is alive while its last
-- announcement is younger than three of them (`runner_alive`): one late announcement does not
-- make it look dead. Each runner stores its own interval, so an API process needs no runner
-- configuration to tell. A runner stopping cleanly deletes its row; a dead runner's row is
-- ignored, and deleted an hour after its last announcement by any runner's presence loop (kept
-- that long so that an administrator can see which runner went away, and when).

CREATE TABLE runners (
    name text PRIMARY KEY,            -- config runner.name, else <hostname>-<pid>; builds.runner
    drivers text[] NOT NULL,          -- the driver types it claims builds of
    parallelism integer NOT NULL CONSTRAINT runners_parallelism_check CHECK (parallelism >= 0),
    version text NOT NULL,            -- marid.__version__ of the runner
    hostname text NOT NULL,
    pid integer NOT NULL,
    announce_interval double precision NOT NULL
        CONSTRAINT runners_announce_interval_check CHECK (announce_interval > 0),
    started_at timestamptz NOT NULL,  -- when this runner's presence loop started
    last_seen_at timestamptz NOT NULL
);

CREATE FUNCTION runner_alive(r runners) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT r.last_seen_at > now() - make_interval(secs => 3 * r.announce_interval)
$$;
