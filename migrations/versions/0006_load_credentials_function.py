"""A function that scopes the tenant and reads a config's sealed credentials in one statement.

``load_credentials`` is the hot path. Through ``tenant_session`` it costs four
round trips (BEGIN, set_config, SELECT, COMMIT); this function sets the tenant
for the statement's own (implicit) transaction and returns the row, so a load
is one round trip, preparable like any SELECT. It is SECURITY INVOKER: row-level
security applies to the caller exactly as to a plain SELECT.

Revision ID: 0006_load_credentials_function
Revises: 0005_tenant_data_keys
"""

from __future__ import annotations

from alembic import op

from tenantvault.db import TENANT_SETTING
from tenantvault.migration_support import options, qualified

revision = "0006_load_credentials_function"
down_revision = "0005_tenant_data_keys"
branch_labels = None
depends_on = None

FUNCTION = "tenantvault_config_credentials"


def upgrade() -> None:
    opts = options()
    name = qualified(FUNCTION)
    op.execute(
        f"""
        CREATE FUNCTION {name}(p_tenant_id text, p_config_id text)
        RETURNS TABLE (type text, encrypted_credentials text)
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        SET search_path = pg_catalog
        AS $$
        BEGIN
          PERFORM set_config('{TENANT_SETTING}', p_tenant_id, true);
          RETURN QUERY
            SELECT c.type, c.encrypted_credentials
            FROM {qualified("email_provider_configs")} c
            WHERE c.tenant_id = p_tenant_id AND c.id = p_config_id AND c.deleted_at IS NULL;
        END
        $$
        """
    )
    op.execute(
        f"COMMENT ON FUNCTION {name}(text, text) IS 'Scope the transaction to a tenant and read "
        "one live config''s type and sealed credentials (the load hot path; RLS applies).'"
    )
    op.execute(f"REVOKE ALL ON FUNCTION {name}(text, text) FROM PUBLIC")
    op.execute(f'GRANT EXECUTE ON FUNCTION {name}(text, text) TO "{opts.app_role}"')


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {qualified(FUNCTION)}(text, text)")
