"""A config and its secrets in one statement, sealed format 3, and older formats
closed in the database.

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

- Older formats are one switch in the database, read by the application and the
  operator alike. ``tenantvault_legacy_values`` records every value not in format 3
  at this upgrade: its place, a SHA-256 of the value and one of what it sits beside
  (its row's type, version and config; a token's row, version and its config's type
  and config). ``tenantvault_sealing.legacy_open`` says whether older formats open
  at all. ``tenantvault_legacy_opens(tenant, table, column, row, value)`` is true
  only while the switch is open and the value is the one recorded for that place,
  still beside what it sat beside then: an old value put back later, or one left in
  place beside a rewritten config, neither opens nor gets re-sealed. The hot-path
  functions return its answer for each older value they read; the full path and key
  rotation ask it. Row-level security on the record as on every tenant table.
- ``tenantvault_load_credentials`` returns that answer too (``legacy_ok``).
- All three return the tenant's oldest active or draining data key version last
  (``oldest_usable_key``): a process still caching a key that a rotation or a shred
  in another process retired or destroyed opens nothing with it.

The functions: EXECUTE for the application role only (as 0010); the record and the
switch: SELECT for the application role, the migrator may also delete recorded
values and close the switch.

Downgrade: refused while any value is sealed in format 3 (the older code cannot open
it, and the older CHECK refuses it); otherwise restores 0009's and 0011's functions
and 0009's CHECKs and drops what this revision made.

Revision ID: 0013_open_config_bound_tokens
Revises: 0012_usable_data_keys_function
"""

from __future__ import annotations

from alembic import op

from tenantvault.db import TENANT_SETTING
from tenantvault.migration_support import (
    Blocker,
    MigrationOptions,
    as_migrator,
    options,
    qualified,
    refuse_blocked,
    revoke_foreign_function_privileges,
    schema_qualified,
    tenant_policy_predicate,
)

revision = "0013_open_config_bound_tokens"
down_revision = "0012_usable_data_keys_function"
branch_labels = None
depends_on = None

OPEN = "tenantvault_open_config"
LOAD = "tenantvault_load_credentials"
OPENS = "tenantvault_legacy_opens"
RECORD = "tenantvault_legacy_values"
SWITCH = "tenantvault_sealing"
CURRENT = "tv3."
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


def _bound(table: str) -> tuple[str, str, str]:
    """(row id, what the value sits beside, the FROM clause) of a sealed column's rows
    as ``t``: the same text at the upgrade's record and at every later check."""
    configs = qualified("email_provider_configs")
    joined = f"JOIN {configs} c ON c.tenant_id = t.tenant_id AND c.id = t.config_id"
    return {
        "email_provider_configs": (
            "t.id",
            "t.type || ':' || t.version || ':' || t.config::text",
            f"{configs} t",
        ),
        "email_provider_tokens": (
            "t.config_id",
            "t.id || ':' || t.version || ':' || c.type || ':' || c.config::text",
            f"{qualified('email_provider_tokens')} t {joined}",
        ),
        "email_provider_config_versions": (
            "t.config_id || ':' || t.version",
            "c.type || ':' || t.version || ':' || t.config::text",
            f"{qualified('email_provider_config_versions')} t {joined}",
        ),
    }[table]


def _legacy_ok(table: str, column: str, value: str, row_id: str) -> str:
    """An SQL expression: true for a value in format 3 or NULL, else whether the
    database lets this older value open (only then is the function called)."""
    return (
        f"CASE WHEN {value} IS NULL OR starts_with({value}, '{CURRENT}') THEN true "
        f"ELSE {qualified(OPENS)}(p_tenant_id, '{table}', '{column}', {row_id}, {value}) END"
    )


def _legacy_record() -> None:
    opts = options()
    record, switch = qualified(RECORD), qualified(SWITCH)
    op.execute(
        f"CREATE TABLE {record} (tenant_id text NOT NULL, table_name text NOT NULL, "
        "column_name text NOT NULL, row_id text NOT NULL, value_sha256 bytea NOT NULL, "
        "bound_sha256 bytea NOT NULL, "
        f"CONSTRAINT pk_{RECORD} PRIMARY KEY (tenant_id, table_name, column_name, row_id))"
    )
    op.execute(
        f"COMMENT ON TABLE {record} IS 'Values sealed in a format older than 3 when the "
        "upgrade to format 3 ran: only these may open (while tenantvault_sealing.legacy_open) "
        "or be re-sealed, and only beside what they sat beside then.'"
    )
    for column, comment in (
        ("tenant_id", "The value''s tenant."),
        ("table_name", "The value''s table."),
        ("column_name", "The value''s column."),
        ("row_id", "The value''s row id, as in its associated data."),
        ("value_sha256", "SHA-256 of the sealed value as it was recorded."),
        ("bound_sha256", "SHA-256 of what it sat beside: its row''s (or its config''s) "
         "type, version and config."),
    ):  # fmt: skip
        op.execute(f"COMMENT ON COLUMN {record}.{column} IS '{comment}'")
    op.execute(f"ALTER TABLE {record} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {record} FORCE ROW LEVEL SECURITY")
    predicate = tenant_policy_predicate()
    op.execute(f"CREATE POLICY tenant_isolation ON {record} USING ({predicate})")
    op.execute(
        f'CREATE POLICY migrator_all_tenants ON {record} TO "{opts.migrator_role}" '
        "USING (true) WITH CHECK (true)"
    )
    op.execute(f'GRANT SELECT ON {record} TO "{opts.app_role}"')
    op.execute(f'GRANT SELECT, DELETE ON {record} TO "{opts.migrator_role}"')
    op.execute(
        f"CREATE TABLE {switch} (id boolean PRIMARY KEY DEFAULT true CHECK (id), "
        "legacy_open boolean NOT NULL)"
    )
    op.execute(
        f"COMMENT ON TABLE {switch} IS 'One row: whether values sealed in a format older than "
        "3 open at all, for the application and the operator alike.'"
    )
    op.execute(f"COMMENT ON COLUMN {switch}.id IS 'Always true: the table holds one row.'")
    op.execute(
        f"COMMENT ON COLUMN {switch}.legacy_open IS 'Older formats open (recorded values only); "
        "closed by rotate-keys once none is left.'"
    )
    op.execute(f"INSERT INTO {switch} (id, legacy_open) VALUES (true, true)")
    op.execute(f'GRANT SELECT ON {switch} TO "{opts.app_role}"')
    op.execute(f'GRANT SELECT, UPDATE (legacy_open) ON {switch} TO "{opts.migrator_role}"')
    # The record is written here only: the migrator (which every tenant's rows admit)
    # may insert into it for this step, and never again.
    op.execute(f'GRANT INSERT ON {record} TO "{opts.migrator_role}"')
    with as_migrator():
        for table, column in SEALED_COLUMNS:
            row_id, bound, source = _bound(table)
            op.execute(
                f"INSERT INTO {record} (tenant_id, table_name, column_name, row_id, "
                "value_sha256, bound_sha256) "
                f"SELECT t.tenant_id, '{table}', '{column}', {row_id}, "
                f"sha256(convert_to(t.{column}, 'UTF8')), sha256(convert_to({bound}, 'UTF8')) "
                f"FROM {source} WHERE t.{column} IS NOT NULL "
                f"AND NOT starts_with(t.{column}, '{CURRENT}')"
            )
    op.execute(f'REVOKE INSERT ON {record} FROM "{opts.migrator_role}"')
    checks = " ".join(
        f"WHEN '{table}' THEN (SELECT {_bound(table)[1]} FROM {_bound(table)[2]} "
        f"WHERE t.tenant_id = p_tenant_id AND {_bound(table)[0]} = p_row_id)"
        for table in dict(SEALED_COLUMNS)
    )
    op.execute(
        f"""
        CREATE FUNCTION {qualified(OPENS)}(p_tenant_id text, p_table text, p_column text,
                                           p_row_id text, p_value text)
        RETURNS boolean
        LANGUAGE sql STABLE SECURITY INVOKER
        SET search_path = pg_catalog
        AS $$
          SELECT coalesce((SELECT s.legacy_open FROM {switch} s), false)
            AND EXISTS (
              SELECT FROM {record} l
              WHERE l.tenant_id = p_tenant_id AND l.table_name = p_table
                AND l.column_name = p_column AND l.row_id = p_row_id
                AND l.value_sha256 = sha256(convert_to(p_value, 'UTF8'))
                AND l.bound_sha256 = sha256(convert_to(CASE p_table {checks} END, 'UTF8')))
        $$
        """
    )
    signature = f"{qualified(OPENS)}(text, text, text, text, text)"
    op.execute(
        f"COMMENT ON FUNCTION {signature} IS 'Whether a value sealed in an older format may "
        "open: the switch is open and it is the value recorded at the upgrade for its place, "
        "beside what it sat beside then.'"
    )
    op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
    op.execute(
        f'GRANT EXECUTE ON FUNCTION {signature} TO "{opts.app_role}", "{opts.migrator_role}"'
    )


def _function(name: str, returns: str, body: str, comment: str, *, lead: str = " ") -> None:
    """A hot-path function: it scopes the transaction to ``p_tenant_id``, then returns
    ``body``'s rows (``lead``: the text between ``RETURN QUERY`` and ``body``, so that a
    downgrade can make 0009's and 0011's functions again to the character)."""
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
          RETURN QUERY{lead}{body};
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
    _legacy_record()
    credentials_ok = _legacy_ok(
        "email_provider_configs", "encrypted_credentials", "c.encrypted_credentials", "c.id"
    )
    # The tenant's oldest active or draining key version (NULL: none): a key a process
    # still caches that another process retired or destroyed since opens nothing.
    oldest = (
        f"(SELECT min(k.version) FROM {qualified('tenant_data_keys')} k "
        "WHERE k.tenant_id = p_tenant_id AND k.state IN ('active', 'draining'))"
    )
    tokens_ok = ", ".join(
        _legacy_ok("email_provider_tokens", column, f"t.{column}", "t.config_id")
        for column in ("encrypted_access_token", "encrypted_refresh_token")
    )
    _function(
        OPEN,
        "type text, name text, config jsonb, is_default boolean, is_active boolean, "
        "created_at timestamp, updated_at timestamp, version integer, "
        f"encrypted_credentials text, {ROW_COLUMNS}, credentials_ok boolean, "
        "access_ok boolean, refresh_ok boolean, oldest_usable_key integer",
        "SELECT c.type, c.name, c.config, c.is_default, c.is_active, c.created_at, "
        f"c.updated_at, c.version, c.encrypted_credentials, {ROW_VALUES}, "
        f"{credentials_ok}, {tokens_ok}, {oldest} "
        f"FROM {configs} c LEFT JOIN {tokens} t "
        "ON t.tenant_id = c.tenant_id AND t.config_id = c.id "
        f"WHERE {live}",
        "Scope the transaction to a tenant and read one live config with its OAuth token "
        "row in one snapshot (open_config; RLS applies).",
    )
    op.execute(f"DROP FUNCTION {qualified(LOAD_TOKEN)}(text, text)")
    _function(
        LOAD_TOKEN,
        f"type text, config jsonb, {ROW_COLUMNS}, access_ok boolean, refresh_ok boolean, "
        "oldest_usable_key integer",
        f"SELECT c.type, c.config, {ROW_VALUES}, {tokens_ok}, {oldest} "
        f"FROM {configs} c JOIN {tokens} t "
        "ON t.tenant_id = c.tenant_id AND t.config_id = c.id "
        f"WHERE {live}",
        "Scope the transaction to a tenant and read one live config''s type, config and "
        "OAuth token row (the token load hot path; RLS applies).",
    )
    op.execute(f"DROP FUNCTION {qualified(LOAD)}(text, text)")
    _function(
        LOAD,
        "type text, version integer, config jsonb, encrypted_credentials text, "
        "legacy_ok boolean, oldest_usable_key integer",
        "SELECT c.type, c.version, c.config, c.encrypted_credentials, "
        f"{credentials_ok}, {oldest} FROM {configs} c WHERE {live}",
        "Scope the transaction to a tenant and read one live config''s type, version, config "
        "and sealed credentials (the load hot path; RLS applies).",
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


def _restore(name: str, returns: str, query: str, comment: str) -> None:
    """The function as 0009 or 0011 made it, to the character (a downgrade restores the
    catalog exactly): its query on a line of its own."""
    _function(name, returns, query, comment, lead="\n            ")


def downgrade() -> None:
    opts = options()
    refuse_blocked(blockers(opts))
    _checks(SEALED_BEFORE)
    op.execute(f"DROP FUNCTION {qualified(LOAD_TOKEN)}(text, text)")
    _restore(
        LOAD_TOKEN,
        "id text, version integer, token_type text, expires_at timestamp,\n"
        "                       scopes text[], encrypted_access_token text, "
        "encrypted_refresh_token text",
        "SELECT t.id, t.version, t.token_type, t.expires_at, t.scopes,\n"
        "                   t.encrypted_access_token, t.encrypted_refresh_token\n"
        f"            FROM {qualified('email_provider_tokens')} t\n"
        "            WHERE t.tenant_id = p_tenant_id AND t.config_id = p_config_id",
        "Scope the transaction to a tenant and read one config''s OAuth token row (the "
        "token load hot path; RLS applies).",
    )
    op.execute(f"DROP FUNCTION {qualified(LOAD)}(text, text)")
    _restore(
        LOAD,
        "type text, version integer, config jsonb, encrypted_credentials text",
        "SELECT c.type, c.version, c.config, c.encrypted_credentials\n"
        f"            FROM {qualified('email_provider_configs')} c\n"
        "            WHERE c.tenant_id = p_tenant_id AND c.id = p_config_id "
        "AND c.deleted_at IS NULL",
        "Scope the transaction to a tenant and read one live config''s type, version, config "
        "and sealed credentials (the load hot path; RLS applies).",
    )
    revoke_foreign_function_privileges()
    op.execute(f"DROP FUNCTION {qualified(OPEN)}(text, text)")
    op.execute(f"DROP FUNCTION {qualified(OPENS)}(text, text, text, text, text)")
    op.execute(f"DROP TABLE {qualified(SWITCH)}")
    op.execute(f"DROP TABLE {qualified(RECORD)}")
