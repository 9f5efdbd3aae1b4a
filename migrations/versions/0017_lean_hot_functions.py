"""The three hot-path functions read what they must, and nothing the caller can decide.

0013's ``tenantvault_load_credentials``, ``tenantvault_load_oauth_token`` and
``tenantvault_open_config`` cost the database about twice what a primary-key read
does (measured by the backend's CPU time per call, bench/vault_load.py's setup):

- each returned, for every sealed value, whether the database lets an older-format
  value open (``legacy_ok``, ``credentials_ok``, ``access_ok``, ``refresh_ok``): a
  CASE over a call of ``tenantvault_legacy_opens``. Its expression is set up on
  every call although a format-3 value never reaches the call. The application now
  tells the format from the value's prefix itself and opens only format 3 on the hot
  path; any other value takes the full path, which asks ``tenantvault_legacy_opens``
  as key rotation does (keys/legacy.py). The columns go.
- the tenant's oldest active or draining data key (``oldest_usable_key``) was a
  ``min()`` aggregate, which the planner answers with a bitmap scan on a small table:
  now the first such key in the primary key's order (the same value, NULL without
  one), an index scan that stops at the first row.

What each function reads, the snapshot, row-level security, ``search_path`` and the
grants are as before.

Downgrade: restores 0013's functions (0016 left them unchanged), to the character.

Revision ID: 0017_lean_hot_functions
Revises: 0016_function_search_paths
"""

from __future__ import annotations

from alembic import op

from tenantvault.db import TENANT_SETTING
from tenantvault.migration_support import (
    options,
    qualified,
    revoke_foreign_function_privileges,
)

revision = "0017_lean_hot_functions"
down_revision = "0016_function_search_paths"
branch_labels = None
depends_on = None

OPEN = "tenantvault_open_config"
LOAD = "tenantvault_load_credentials"
LOAD_TOKEN = "tenantvault_load_oauth_token"  # noqa: S105 - a function name
OPENS = "tenantvault_legacy_opens"
ROW_COLUMNS = (
    "token_id text, token_version integer, token_type text, expires_at timestamp, "
    "scopes text[], encrypted_access_token text, encrypted_refresh_token text"
)
ROW_VALUES = (
    "t.id, t.version, t.token_type, t.expires_at, t.scopes, t.encrypted_access_token, "
    "t.encrypted_refresh_token"
)
COMMENTS = {
    OPEN: "Scope the transaction to a tenant and read one live config with its OAuth token "
    "row in one snapshot (open_config; RLS applies).",
    LOAD_TOKEN: "Scope the transaction to a tenant and read one live config''s type, config "
    "and OAuth token row (the token load hot path; RLS applies).",
    LOAD: "Scope the transaction to a tenant and read one live config''s type, version, config "
    "and sealed credentials (the load hot path; RLS applies).",
}


def _legacy_ok(table: str, column: str, value: str, row_id: str) -> str:
    """0013's column: true for a value in format 3 or NULL, else the database's answer."""
    return (
        f"CASE WHEN {value} IS NULL OR starts_with({value}, 'tv3.') THEN true "
        f"ELSE {qualified(OPENS)}(p_tenant_id, '{table}', '{column}', {row_id}, {value}) END"
    )


def _oldest(lean: bool) -> str:
    """The tenant's oldest active or draining data key version (NULL: none)."""
    keys = qualified("tenant_data_keys")
    usable = "k.tenant_id = p_tenant_id AND k.state IN ('active', 'draining')"
    if lean:
        # The primary key (tenant_id, version) gives the order: the scan stops at the
        # first usable key.
        return f"(SELECT k.version FROM {keys} k WHERE {usable} ORDER BY k.version LIMIT 1)"
    return f"(SELECT min(k.version) FROM {keys} k WHERE {usable})"


def _functions(lean: bool) -> list[tuple[str, str, str]]:
    """(name, columns returned, query) of the three functions: 0017's (``lean``) or
    0013's, whose text is restored exactly."""
    configs, tokens = qualified("email_provider_configs"), qualified("email_provider_tokens")
    live = "c.tenant_id = p_tenant_id AND c.id = p_config_id AND c.deleted_at IS NULL"
    oldest = _oldest(lean)
    if lean:
        credentials_ok = tokens_ok = ""
        credentials_col = tokens_col = ""
    else:
        credentials_ok = ", " + _legacy_ok(
            "email_provider_configs", "encrypted_credentials", "c.encrypted_credentials", "c.id"
        )
        tokens_ok = ", " + ", ".join(
            _legacy_ok("email_provider_tokens", column, f"t.{column}", "t.config_id")
            for column in ("encrypted_access_token", "encrypted_refresh_token")
        )
        credentials_col = ", legacy_ok boolean"
        tokens_col = ", access_ok boolean, refresh_ok boolean"
    return [
        (
            OPEN,
            "type text, name text, config jsonb, is_default boolean, is_active boolean, "
            "created_at timestamp, updated_at timestamp, version integer, "
            f"encrypted_credentials text, {ROW_COLUMNS}"
            + (", credentials_ok boolean" if not lean else "")
            + tokens_col
            + ", oldest_usable_key integer",
            "SELECT c.type, c.name, c.config, c.is_default, c.is_active, c.created_at, "
            f"c.updated_at, c.version, c.encrypted_credentials, {ROW_VALUES}"
            f"{credentials_ok}{tokens_ok}, {oldest} "
            f"FROM {configs} c LEFT JOIN {tokens} t "
            "ON t.tenant_id = c.tenant_id AND t.config_id = c.id "
            f"WHERE {live}",
        ),
        (
            LOAD_TOKEN,
            f"type text, config jsonb, {ROW_COLUMNS}{tokens_col}, oldest_usable_key integer",
            f"SELECT c.type, c.config, {ROW_VALUES}{tokens_ok}, {oldest} "
            f"FROM {configs} c JOIN {tokens} t "
            "ON t.tenant_id = c.tenant_id AND t.config_id = c.id "
            f"WHERE {live}",
        ),
        (
            LOAD,
            "type text, version integer, config jsonb, encrypted_credentials text"
            f"{credentials_col}, oldest_usable_key integer",
            "SELECT c.type, c.version, c.config, c.encrypted_credentials"
            f"{credentials_ok}, {oldest} FROM {configs} c WHERE {live}",
        ),
    ]


def _create(name: str, returns: str, body: str) -> None:
    """A hot-path function as 0013 made them: it scopes the transaction to
    ``p_tenant_id``, then returns ``body``'s rows; EXECUTE for the application only."""
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
    op.execute(f"COMMENT ON FUNCTION {qualified_name}(text, text) IS '{COMMENTS[name]}'")
    op.execute(f"REVOKE ALL ON FUNCTION {qualified_name}(text, text) FROM PUBLIC")
    op.execute(f'GRANT EXECUTE ON FUNCTION {qualified_name}(text, text) TO "{opts.app_role}"')


def _replace(lean: bool) -> None:
    # The columns returned change: each function is dropped and made again, in this
    # revision's transaction (no caller sees one missing).
    for name, returns, body in _functions(lean):
        op.execute(f"DROP FUNCTION {qualified(name)}(text, text)")
        _create(name, returns, body)
    # As 0010: what a schema's default privileges granted on the new functions goes.
    revoke_foreign_function_privileges()


def upgrade() -> None:
    _replace(lean=True)


def downgrade() -> None:
    _replace(lean=False)
