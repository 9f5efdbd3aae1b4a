"""The OAuth token load as one statement, as 0009 made the credentials load.

- ``tenantvault_load_oauth_token(tenant, config)``: scopes the transaction to the
  tenant (``set_config(..., true)``) and returns the config's token row: what opening
  its two sealed values and building the token needs. Row-level security applies
  (SECURITY INVOKER). In autocommit the tenant setting ends with the statement.
  ``expires_at`` is the column's own ``timestamp`` holding UTC, as the schema keeps it.
  EXECUTE for the application role only (as 0010, whatever the schema's default
  privileges grant).

Downgrade: drops the function (no data lives in it).

Revision ID: 0011_load_oauth_token_function
Revises: 0010_no_inherited_privileges
"""

from __future__ import annotations

from alembic import op

from tenantvault.db import TENANT_SETTING
from tenantvault.migration_support import options, qualified, revoke_foreign_function_privileges

revision = "0011_load_oauth_token_function"
down_revision = "0010_no_inherited_privileges"
branch_labels = None
depends_on = None

FUNCTION = "tenantvault_load_oauth_token"


def upgrade() -> None:
    opts = options()
    name = qualified(FUNCTION)
    op.execute(
        f"""
        CREATE FUNCTION {name}(p_tenant_id text, p_config_id text)
        RETURNS TABLE (id text, version integer, token_type text, expires_at timestamp,
                       scopes text[], encrypted_access_token text, encrypted_refresh_token text)
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        SET search_path = pg_catalog
        AS $$
        BEGIN
          PERFORM set_config('{TENANT_SETTING}', p_tenant_id, true);
          RETURN QUERY
            SELECT t.id, t.version, t.token_type, t.expires_at, t.scopes,
                   t.encrypted_access_token, t.encrypted_refresh_token
            FROM {qualified("email_provider_tokens")} t
            WHERE t.tenant_id = p_tenant_id AND t.config_id = p_config_id;
        END
        $$
        """
    )
    op.execute(
        f"COMMENT ON FUNCTION {name}(text, text) IS 'Scope the transaction to a tenant and read "
        "one config''s OAuth token row (the token load hot path; RLS applies).'"
    )
    op.execute(f"REVOKE ALL ON FUNCTION {name}(text, text) FROM PUBLIC")
    op.execute(f'GRANT EXECUTE ON FUNCTION {name}(text, text) TO "{opts.app_role}"')
    # As 0010: what a schema's default privileges granted on the new function goes.
    revoke_foreign_function_privileges()


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {qualified(FUNCTION)}(text, text)")
