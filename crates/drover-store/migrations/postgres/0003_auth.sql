-- Who may do what: users, their tokens, and the audit trail.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    role          TEXT NOT NULL,             -- admin | user
    password_hash TEXT NOT NULL,             -- argon2id, PHC string
    created_at    BIGINT NOT NULL
);

-- Access, refresh and API tokens; only their sha256 is kept. A login starts a family: its
-- refresh token rotates within it, and presenting a rotated one again revokes the family.
CREATE TABLE auth_tokens (
    token_hash   TEXT PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    kind         TEXT NOT NULL,              -- access | refresh | api
    user_id      TEXT NOT NULL REFERENCES users (id),
    family       TEXT,                       -- the login it belongs to (access, refresh)
    name         TEXT,                       -- api tokens
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    used_at      BIGINT,                         -- a refresh token that was rotated
    revoked_at   BIGINT
);
CREATE INDEX auth_tokens_family ON auth_tokens (family) WHERE family IS NOT NULL;
CREATE INDEX auth_tokens_user ON auth_tokens (user_id, kind);

CREATE TABLE audit (
    seq     BIGSERIAL PRIMARY KEY,
    at      BIGINT NOT NULL,
    actor   TEXT,                            -- user name, node id, or null when unknown
    action  TEXT NOT NULL,                   -- login, token.create, node.revoke, …
    target  TEXT,
    outcome TEXT NOT NULL,                   -- ok | refused
    address TEXT,
    detail  TEXT
);

-- Whose it is: a user sees and controls their own; an admin everything.
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE groups ADD COLUMN owner TEXT;
ALTER TABLE reservations ADD COLUMN owner TEXT;
