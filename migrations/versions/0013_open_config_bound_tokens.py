"""A config and its secrets in one statement, and sealed format 3.

- ``tenantvault_open_config(tenant, config)``: scopes the transaction to the tenant
  (``set_config(..., true)``) and returns one live config row with its token row
  (NULLs when it has none), read in one snapshot: what ``Vault.open_config`` verifies
  together. SECURITY INVOKER: row-level security applies.
- ``tenantvault_load_oauth_token(tenant, config)`` now also returns the config's type
  and config (format 3 binds tokens to them), and only for a live config: the tokens
  of a soft-deleted config do not load.
- The sealed-value CHECK constraints of 0009 accept ``tv3.`` (format 3 binds
  credentials to their config's type too, and tokens to their config's type and
  content). Added ``NOT VALID`` and validated in a second step, as 0009 did: the
  validation takes SHARE UPDATE EXCLUSIVE, which blocks no reads or writes.

Both functions: EXECUTE for the application role only (as 0010).

Downgrade: refused while any value is sealed in format 3 (the older code cannot open
it, and the older CHECK refuses it); otherwise restores 0011's function and 0009's
CHECKs and drops ``tenantvault_open_config``.

Revision ID: 0013_open_config_bound_tokens
Revises: 0012_usable_data_keys_function
"""

from __future__ import annotations

from alembic import op

from tenantvault.db import TENANT_SETTING
from tenantvault.migration_support import (
    Blocker,
    MigrationOptions,
    options,
    qualified,
    refuse_blocked,
    revoke_foreign_function_privileges,
    schema_qualified,
)

revision = "0013_open_config_bound_tokens"
down_revision = "0012_usable_data_keys_function"
branch_labels = None
depends_on = None

OPEN = "tenantvault_open_config"
LOAD_TOKEN = "tenantvault_load_oauth_token"  # noqa: S105 - a function name
SEALED = r"^tv[123]\.[1-9][0-9]{0,9}\.[A-Za-z0-9_-]+$"
SEALED_BEFORE = r"^tv[12]\.[1-9][0-9]{0,9}\.[A-Za-z0-9_-]+$"
SEALED_COLUMNS = [
    ("email_provider_configs", "encrypted_credentials"),
    ("email_provider_tokens", "encrypted_access_token"),
    ("email_provider_tokens", "encrypted_refresh_token"),
    ("email_provider_config_versions", "encrypted_credentials"),
]
ROW_COLUMNS = (
    "token_id text, token_version integer, token_type text, expires_at timestamp, "
    "scopes text[], encrypted_access_token text, encrypted_refresh_token text"
)
ROW_VALUES = (
    "t.id, t.version, t.token_type, t.expires_at, t.scopes, t.encrypted_access_token, "
    "t.encrypted_refresh_token"
)


def _function(name: str, returns: str, body: str, comment: str) -> None:
    opts = options()
    qualified_name = qualified(name)
    op.execute(
        f"""
        CREATE FUNCTION {qualified_name}(p_tenant_id text, p_config_id text)
        RETURNS TABLE ({returns})
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        SET search_path = pg_catalog
        AS $$
        BEGIN
          PERFORM set_config('{TENANT_SETTING}', p_tenant_id, true);
          RETURN QUERY {body};
        END
        $$
        """
    )
    op.execute(f"COMMENT ON FUNCTION {qualified_name}(text, text) IS '{comment}'")
    op.execute(f"REVOKE ALL ON FUNCTION {qualified_name}(text, text) FROM PUBLIC")
    op.execute(f'GRANT EXECUTE ON FUNCTION {qualified_name}(text, text) TO "{opts.app_role}"')


def _checks(pattern: str) -> None:
    for table, column in SEALED_COLUMNS:
        check = f"ck_{table}_{column}_sealed"
        op.execute(f"ALTER TABLE {qualified(table)} DROP CONSTRAINT {check}")
        op.execute(
            f"ALTER TABLE {qualified(table)} ADD CONSTRAINT {check} "
            f"CHECK ({column} IS NULL OR {column} ~ '{pattern}') NOT VALID"
        )
        op.execute(
            "DO $$ BEGIN\n"
            f"  ALTER TABLE {qualified(table)} VALIDATE CONSTRAINT {check};\n"
            "EXCEPTION WHEN check_violation THEN\n"
            f"  RAISE WARNING 'tenantvault: {table}.{column} holds values that are not sealed "
            f"values; {check} holds for new writes only until rotate-keys has reported them and "
            "they are fixed';\n"
            "END $$"
        )


def upgrade() -> None:
    configs, tokens = qualified("email_provider_configs"), qualified("email_provider_tokens")
    live = "c.tenant_id = p_tenant_id AND c.id = p_config_id AND c.deleted_at IS NULL"
    _function(
        OPEN,
        "type text, name text, config jsonb, is_default boolean, is_active boolean, "
        "created_at timestamp, updated_at timestamp, version integer, "
        f"encrypted_credentials text, {ROW_COLUMNS}",
        "SELECT c.type, c.name, c.config, c.is_default, c.is_active, c.created_at, "
        f"c.updated_at, c.version, c.encrypted_credentials, {ROW_VALUES} "
        f"FROM {configs} c LEFT JOIN {tokens} t "
        "ON t.tenant_id = c.tenant_id AND t.config_id = c.id "
        f"WHERE {live}",
        "Scope the transaction to a tenant and read one live config with its OAuth token "
        "row in one snapshot (open_config; RLS applies).",
    )
    op.execute(f"DROP FUNCTION {qualified(LOAD_TOKEN)}(text, text)")
    _function(
        LOAD_TOKEN,
        f"type text, config jsonb, {ROW_COLUMNS}",
        f"SELECT c.type, c.config, {ROW_VALUES} "
        f"FROM {configs} c JOIN {tokens} t "
        "ON t.tenant_id = c.tenant_id AND t.config_id = c.id "
        f"WHERE {live}",
        "Scope the transaction to a tenant and read one live config''s type, config and "
        "OAuth token row (the token load hot path; RLS applies).",
    )
    # As 0010: what a schema's default privileges granted on the new functions goes.
    revoke_foreign_function_privileges()
    _checks(SEALED)


def blockers(opts: MigrationOptions) -> list[Blocker]:
    """What this downgrade cannot keep: values sealed in format 3."""
    return [
        Blocker(
            f"values sealed in format 3 ({table}.{column})",
            f"FROM {schema_qualified(opts.schema, table)} WHERE starts_with({column}, 'tv3.')",
        )
        for table, column in SEALED_COLUMNS
    ]


def downgrade() -> None:
    opts = options()
    refuse_blocked(blockers(opts))
    _checks(SEALED_BEFORE)
    op.execute(f"DROP FUNCTION {qualified(LOAD_TOKEN)}(text, text)")
    _function(
        LOAD_TOKEN,
        "id text, version integer, token_type text, expires_at timestamp, scopes text[], "
        "encrypted_access_token text, encrypted_refresh_token text",
        f"SELECT {ROW_VALUES} FROM {qualified('email_provider_tokens')} t "
        "WHERE t.tenant_id = p_tenant_id AND t.config_id = p_config_id",
        "Scope the transaction to a tenant and read one config''s OAuth token row (the "
        "token load hot path; RLS applies).",
    )
    revoke_foreign_function_privileges()
    op.execute(f"DROP FUNCTION {qualified(OPEN)}(text, text)")
