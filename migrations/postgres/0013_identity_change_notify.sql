-- Announces every change to an agent or an API key on `tmws_identity` (no payload), so that each
-- replica drops the credentials it remembers (TMWS_AUTH_CACHE_TTL): a revoked key, a suspended
-- agent or a changed role takes effect on every replica as soon as the announcement arrives,
-- whoever made the change (any replica, the CLI, plain SQL). New rows need none: only found
-- credentials are remembered.
CREATE FUNCTION identity_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tmws_identity', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER agents_changed AFTER UPDATE OR DELETE OR TRUNCATE ON agents
    FOR EACH STATEMENT EXECUTE FUNCTION identity_changed();
CREATE TRIGGER api_keys_changed AFTER UPDATE OR DELETE OR TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION identity_changed();
