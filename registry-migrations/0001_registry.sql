-- The registry: one table per resource kind, the version history and its change log.
--
-- Each resource row keeps the resource as its protobuf encoding (`body`, a sluice.v1 message of
-- its kind) beside the columns the database must constrain or index. Foreign keys and
-- uniqueness constraints are DEFERRABLE INITIALLY DEFERRED: one transaction (one version) may
-- create a consumer and its subscription, delete them, or swap two names, in any order; the
-- checks run at COMMIT.

-- The head of the history. Every writer locks this one row first, which serialises commits:
-- version numbers are contiguous and no update is lost.
CREATE TABLE registry_head (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version    bigint  NOT NULL CHECK (version >= 0),
    -- Sum, modulo 2^256, of the SHA-256 of every resource (see control-plane/src/registry/hash.rs).
    state_hash bytea   NOT NULL CHECK (length(state_hash) = 32)
);
INSERT INTO registry_head (version, state_hash) VALUES (0, decode(repeat('00', 32), 'hex'));

CREATE TABLE versions (
    number       bigint      PRIMARY KEY CHECK (number > 0),
    content_hash text        NOT NULL CHECK (content_hash ~ '^[0-9a-f]{64}$'),
    actor        text        NOT NULL,
    message      text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    change_count integer     NOT NULL CHECK (change_count > 0)
);

-- What each version changed: the resource before and after (NULL when created / deleted).
CREATE TABLE changes (
    version     bigint  NOT NULL REFERENCES versions (number) ON DELETE CASCADE,
    seq         integer NOT NULL,
    kind        text    NOT NULL,
    resource_id uuid    NOT NULL,
    grp         text    NOT NULL,
    name        text    NOT NULL,
    before      bytea,
    after       bytea,
    PRIMARY KEY (version, seq),
    CHECK (before IS NOT NULL OR after IS NOT NULL)
);
CREATE INDEX changes_by_resource ON changes (resource_id, version, seq);

-- Columns every resource table has.
--   id               stable identity
--   grp              the group (environment); never changes for a resource
--   name             unique per kind and group
--   resource_version incremented on every change (ETag / If-Match)
--   body             the resource, protobuf-encoded

CREATE TABLE apis (
    id uuid PRIMARY KEY, grp text NOT NULL, name text NOT NULL,
    resource_version bigint NOT NULL CHECK (resource_version > 0), body bytea NOT NULL,
    UNIQUE (grp, name) DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE upstreams (
    id uuid PRIMARY KEY, grp text NOT NULL, name text NOT NULL,
    resource_version bigint NOT NULL CHECK (resource_version > 0), body bytea NOT NULL,
    UNIQUE (grp, name) DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE consumers (
    id uuid PRIMARY KEY, grp text NOT NULL, name text NOT NULL,
    resource_version bigint NOT NULL CHECK (resource_version > 0), body bytea NOT NULL,
    UNIQUE (grp, name) DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE plans (
    id uuid PRIMARY KEY, grp text NOT NULL, name text NOT NULL,
    resource_version bigint NOT NULL CHECK (resource_version > 0), body bytea NOT NULL,
    monthly_quota bigint NOT NULL CHECK (monthly_quota >= 0),
    UNIQUE (grp, name) DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE policies (
    id uuid PRIMARY KEY, grp text NOT NULL, name text NOT NULL,
    resource_version bigint NOT NULL CHECK (resource_version > 0), body bytea NOT NULL,
    kind text NOT NULL CHECK (kind IN
        ('key_auth', 'jwt', 'mtls', 'rate_limit', 'cors', 'ip_restriction', 'request_size')),
    UNIQUE (grp, name) DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE brokers (
    id uuid PRIMARY KEY, grp text NOT NULL, name text NOT NULL,
    resource_version bigint NOT NULL CHECK (resource_version > 0), body bytea NOT NULL,
    kind text NOT NULL CHECK (kind IN ('kafka', 'memory')),
    UNIQUE (grp, name) DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE credentials (
    id uuid PRIMARY KEY, grp text NOT NULL, name text NOT NULL,
    resource_version bigint NOT NULL CHECK (resource_version > 0), body bytea NOT NULL,
    consumer_id uuid NOT NULL REFERENCES consumers (id) DEFERRABLE INITIALLY DEFERRED,
    kind text NOT NULL CHECK (kind IN ('api_key', 'jwt', 'mtls')),
    -- Set for API keys only: one key opens one consumer per group.
    api_key_sha256 text CHECK (api_key_sha256 ~ '^[0-9a-f]{64}$'),
    -- Set for JWT credentials only: one issuer and subject name one consumer per group.
    jwt_issuer  text,
    jwt_subject text,
    CHECK ((kind = 'jwt') = (jwt_issuer IS NOT NULL AND jwt_subject IS NOT NULL)),
    CHECK ((kind = 'api_key') = (api_key_sha256 IS NOT NULL)),
    UNIQUE (grp, name) DEFERRABLE INITIALLY DEFERRED,
    UNIQUE (grp, api_key_sha256) DEFERRABLE INITIALLY DEFERRED,
    UNIQUE (grp, jwt_issuer, jwt_subject) DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX credentials_by_consumer ON credentials (consumer_id);

CREATE TABLE subscriptions (
    id uuid PRIMARY KEY, grp text NOT NULL, name text NOT NULL,
    resource_version bigint NOT NULL CHECK (resource_version > 0), body bytea NOT NULL,
    consumer_id uuid NOT NULL REFERENCES consumers (id) DEFERRABLE INITIALLY DEFERRED,
    api_id      uuid NOT NULL REFERENCES apis (id) DEFERRABLE INITIALLY DEFERRED,
    plan_id     uuid NOT NULL REFERENCES plans (id) DEFERRABLE INITIALLY DEFERRED,
    status text NOT NULL CHECK (status IN ('active', 'suspended')),
    UNIQUE (grp, name) DEFERRABLE INITIALLY DEFERRED,
    UNIQUE (consumer_id, api_id) DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX subscriptions_by_api ON subscriptions (api_id);
CREATE INDEX subscriptions_by_plan ON subscriptions (plan_id);

-- Every id in use, of any kind, routes included (their ids share the space): an id names one
-- thing only, whatever table it is in. Kept by the commit path with the rows.
CREATE TABLE resource_ids (
    id    uuid PRIMARY KEY,
    kind  text NOT NULL,
    -- For a route, the API it belongs to.
    owner uuid
);
CREATE INDEX resource_ids_by_owner ON resource_ids (owner) WHERE owner IS NOT NULL;

-- References held inside resource bodies (an API's routes → upstreams, brokers, policies),
-- which no column carries: deleting a resource that is still referenced is refused.
CREATE TABLE resource_refs (
    from_id uuid NOT NULL,
    to_id   uuid NOT NULL,
    to_kind text NOT NULL,
    PRIMARY KEY (from_id, to_id)
);
CREATE INDEX resource_refs_by_target ON resource_refs (to_id);

-- Admin API tokens. Only a hash is stored; the token is shown once, when created.
CREATE TABLE admin_tokens (
    id           uuid        PRIMARY KEY,
    name         text        NOT NULL UNIQUE,
    role         text        NOT NULL CHECK (role IN ('viewer', 'editor', 'admin')),
    token_sha256 text        NOT NULL UNIQUE CHECK (token_sha256 ~ '^[0-9a-f]{64}$'),
    prefix       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text        NOT NULL
);
