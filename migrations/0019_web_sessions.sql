-- Why: issue 13. The web interface signs people in with their username and password and keeps
-- them signed in with a session cookie (marid/sessions.py, docs/web.md). A session is the
-- user's own access, like HTTP Basic credentials: no scope narrows it.
--
-- The cookie's value is a random secret shown only to the browser; the table keeps its SHA-256
-- digest, as `tokens` does, so a copy of the database signs nobody in. Each session has its
-- own CSRF secret, which every form of the interface carries and every POST must send back.
-- A session ends when the user signs out, when it was idle for too long or grew too old
-- (expires_at: the earlier of its idle and absolute limits, moved on as it is used), when the
-- user's password is set again, and with the user.

CREATE TABLE web_sessions (
    id bigserial PRIMARY KEY,
    digest text NOT NULL CONSTRAINT web_sessions_digest_key UNIQUE,  -- SHA-256 of the cookie
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf text NOT NULL,                -- the forms' CSRF secret
    created_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    user_agent text NOT NULL DEFAULT ''  -- shown to the user beside their sessions
);

CREATE INDEX web_sessions_user_id_idx ON web_sessions (user_id);
CREATE INDEX web_sessions_expires_at_idx ON web_sessions (expires_at);
