-- TLS certificates the data planes' TLS listeners present, chosen by SNI. The server names
-- are in the body; their uniqueness across a group is checked by the shared validator.
CREATE TABLE certificates (
    id uuid PRIMARY KEY, grp text NOT NULL, name text NOT NULL,
    resource_version bigint NOT NULL CHECK (resource_version > 0), body bytea NOT NULL,
    UNIQUE (grp, name) DEFERRABLE INITIALLY DEFERRED
);
