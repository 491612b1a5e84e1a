-- Why: issue 11 row 11 (RFC 6749 §4.1.2, docs/api.md §16.3 and §23). A replayed code must revoke
-- the token issued for it, so a code records the digest of the token it produced. Deleting an
-- app must revoke every token that came through it, including personal tokens minted (POST
-- /tokens) with one of its tokens, or with a token minted that way: those carry the app in
-- `via_app_id` and die with it.

ALTER TABLE oauth_codes ADD COLUMN token_digest text;

ALTER TABLE tokens ADD COLUMN via_app_id bigint REFERENCES apps (id) ON DELETE CASCADE;
