-- Why: issue 11 row 14. Deleting a namespace detached its variables and SSH keys, and a
-- detached one stays owned by the namespace owner (user_id): a collaborator's variable or key
-- thereby became the owner's, shown among theirs and frozen into the owner's builds without a
-- namespace next to the owner's personal secrets. Now the variables and keys a collaborator
-- wrote (author_id is not the owner) are deleted with the namespace; the owner's own are
-- detached as before (docs/api.md §8.6). Objects and images are kept detached, as queued builds
-- may still need their content, and a build never uses a detached one written by someone else
-- (marid/submit.py, marid/images.py).

CREATE OR REPLACE FUNCTION variables_detach() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM variables WHERE namespace_id = OLD.id AND author_id <> user_id;
    UPDATE variables SET namespace_id = NULL, detached = true WHERE namespace_id = OLD.id;
    RETURN OLD;
END;
$$;

CREATE OR REPLACE FUNCTION ssh_keys_detach() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM ssh_keys WHERE namespace_id = OLD.id AND author_id <> user_id;
    UPDATE ssh_keys SET namespace_id = NULL, detached = true WHERE namespace_id = OLD.id;
    RETURN OLD;
END;
$$;

-- What earlier deletions already moved to the owner goes too.
DELETE FROM variables WHERE detached AND author_id <> user_id;
DELETE FROM ssh_keys WHERE detached AND author_id <> user_id;
