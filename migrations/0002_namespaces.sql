-- Why: namespaces group resources and carry visibility and collaborators (docs/api.md §3, §8, §9).
-- A tree shares one owner; collaborators and invites are stored against its root.

CREATE TABLE namespaces (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    root_id bigint NOT NULL REFERENCES namespaces (id) ON DELETE CASCADE,
    parent_id bigint REFERENCES namespaces (id) ON DELETE CASCADE,
    name text NOT NULL,
    path text NOT NULL,
    description text NOT NULL DEFAULT '',
    visibility text NOT NULL
        CONSTRAINT namespaces_visibility_check CHECK (visibility IN ('private', 'internal', 'public')),
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT namespaces_user_id_path_key UNIQUE (user_id, path)
);
CREATE INDEX namespaces_root_id_idx ON namespaces (root_id);
CREATE INDEX namespaces_parent_id_idx ON namespaces (parent_id);

CREATE TABLE namespace_collaborators (
    namespace_id bigint NOT NULL REFERENCES namespaces (id) ON DELETE CASCADE,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace_id, user_id)
);
CREATE INDEX namespace_collaborators_user_id_idx ON namespace_collaborators (user_id);

CREATE TABLE invites (
    id bigserial PRIMARY KEY,
    namespace_id bigint NOT NULL REFERENCES namespaces (id) ON DELETE CASCADE,
    invitee_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    inviter_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT invites_namespace_id_invitee_id_key UNIQUE (namespace_id, invitee_id)
);
CREATE INDEX invites_invitee_id_idx ON invites (invitee_id);

-- Every namespace with each user who may use it: its owner and its root's collaborators.
-- "My resources" listings (docs/api.md §3.3) and the "use" right (§3.2) both read this.
CREATE VIEW namespace_members AS
    SELECT n.id AS namespace_id, n.user_id FROM namespaces n
    UNION ALL
    SELECT n.id, c.user_id
    FROM namespaces n JOIN namespace_collaborators c ON c.namespace_id = n.root_id;

-- Namespaces with their owner, which every namespace entity embeds (and its URL names).
CREATE VIEW namespaces_with_owner AS
    SELECT n.id, n.user_id, n.root_id, n.parent_id, n.name, n.path, n.description,
           n.visibility, n.created_at,
           u.username AS owner_username, u.email AS owner_email,
           u.created_at AS owner_created_at
    FROM namespaces n JOIN users u ON u.id = n.user_id;
