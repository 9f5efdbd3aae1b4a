"""Many tenants' usable data keys in one statement, for fleet warm-up.

- ``tenantvault_usable_data_keys(tenants)``: for each tenant of the array, in
  order, scopes the transaction to it (``set_config(..., true)``) and returns its
  active and draining keys (tenant, version, wrapped key); destroyed and retired
  keys stay out. Row-level security applies to every read (SECURITY INVOKER): each
  tenant's keys are read while the transaction is scoped to that tenant, as a
  load reads them, never by lifting the policy. At the end the setting is cleared,
  so the rest of the transaction is scoped to no tenant.

Downgrade: drops the function (no data lives in it).

Revision ID: 0012_usable_data_keys_function
Revises: 0011_load_oauth_token_function
"""

from __future__ import annotations

from alembic import op

from tenantvault.db import TENANT_SETTING
from tenantvault.migration_support import options, qualified, revoke_foreign_function_privileges

revision = "0012_usable_data_keys_function"
down_revision = "0011_load_oauth_token_function"
branch_labels = None
depends_on = None

FUNCTION = "tenantvault_usable_data_keys"


def upgrade() -> None:
    opts = options()
    name = qualified(FUNCTION)
    op.execute(
        f"""
        CREATE FUNCTION {name}(p_tenant_ids text[])
        RETURNS TABLE (tenant_id text, version integer, wrapped_key text)
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        SET search_path = pg_catalog
        AS $$
        DECLARE
          v_tenant text;
        BEGIN
          FOREACH v_tenant IN ARRAY p_tenant_ids LOOP
            PERFORM set_config('{TENANT_SETTING}', v_tenant, true);
            RETURN QUERY
              SELECT k.tenant_id, k.version, k.wrapped_key
              FROM {qualified("tenant_data_keys")} k
              WHERE k.tenant_id = v_tenant AND k.state IN ('active', 'draining')
              ORDER BY k.version;
          END LOOP;
          PERFORM set_config('{TENANT_SETTING}', '', true);
        END
        $$
        """
    )
    op.execute(
        f"COMMENT ON FUNCTION {name}(text[]) IS 'For each tenant in turn, scope the transaction "
        "to it and read its active and draining data keys, wrapped (fleet warm-up; RLS applies "
        "to every read); the tenant setting is cleared at the end.'"
    )
    op.execute(f"REVOKE ALL ON FUNCTION {name}(text[]) FROM PUBLIC")
    op.execute(f'GRANT EXECUTE ON FUNCTION {name}(text[]) TO "{opts.app_role}"')
    # As 0010: what a schema's default privileges granted on the new function goes.
    revoke_foreign_function_privileges()
    # As 0010: what a schema's default privileges granted on the new function goes.
    revoke_foreign_function_privileges()


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {qualified(FUNCTION)}(text[])")
