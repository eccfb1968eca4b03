-- A client-certificate credential's identity, unique per group as API keys and JWT subjects
-- are: one certificate (`sha256:` its fingerprint), or one subject under one CA (`subject:`,
-- the CA's fingerprint or nothing, `:`, the subject) names one consumer. Rows written before
-- this migration have none until they are written again.
ALTER TABLE credentials ADD COLUMN mtls_identity text;
ALTER TABLE credentials ADD CONSTRAINT credentials_grp_mtls_identity_key
    UNIQUE (grp, mtls_identity) DEFERRABLE INITIALLY DEFERRED;
