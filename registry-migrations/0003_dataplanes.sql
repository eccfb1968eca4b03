-- Data-plane status, written by the discovery server of whichever replica a node is connected
-- to, so any replica can answer `GET /v1/dataplanes`. One row per node id.
CREATE TABLE dataplanes (
    id                text PRIMARY KEY,
    grp               text NOT NULL,
    -- The Node the data plane said Hello with (protobuf).
    node              bytea NOT NULL,
    -- The control-plane replica it is connected to; '' when disconnected.
    connected_replica text NOT NULL DEFAULT '',
    connected_since   timestamptz,
    last_seen         timestamptz NOT NULL,
    applied_version   bigint NOT NULL DEFAULT 0,
    applied_hash      text NOT NULL DEFAULT '',
    last_ack_at       timestamptz,
    last_nack_at      timestamptz,
    -- The last Nack (protobuf).
    last_nack         bytea,
    -- Why the control plane refused to serve the node, if it did.
    refused_reason    text NOT NULL DEFAULT ''
);
CREATE INDEX dataplanes_by_group ON dataplanes (grp);
