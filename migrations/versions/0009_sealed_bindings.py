"""Sealed values bound to their config and version; checks that keep sealed columns and
data keys well-formed.

- ``tenantvault_load_credentials(tenant, config)``: the load hot path (as 0006's
  function) also returns the config's version and config, which format-2
  credentials are bound to.
- A CHECK on every sealed column: NULL or a sealed value (``tv1.``/``tv2.``), so a
  stray write of plaintext or garbage is refused. Added NOT VALID and then
  validated; where an existing row breaks it, validation is skipped with a
  warning (the constraint still holds for every new write) and ``rotate-keys``
  reports the row.
- ``tenant_data_keys``: the application role may insert only a key's tenant,
  version, wrapped key and KEK version (a new key is active by default), and a
  CHECK ties ``kek_version`` to the version the wrapped key names (``vault:vN:``).
  ``seals`` counts the values sealed under each key (its AES-GCM nonce budget);
  the application role may update that column only.
- ``audit_chain_heads.anchor_mac``: retention's start marker, authenticated by
  the key provider (a MAC the database owner cannot make).

Revision ID: 0009_sealed_bindings
Revises: 0008_audit_and_lifecycle
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tenantvault.db import TENANT_SETTING
from tenantvault.migration_support import (
    Blocker,
    MigrationOptions,
    options,
    qualified,
    refuse_blocked,
    schema_qualified,
)

revision = "0009_sealed_bindings"
down_revision = "0008_audit_and_lifecycle"
branch_labels = None
depends_on = None

FUNCTION = "tenantvault_load_credentials"
SEALED = r"^tv[12]\.[1-9][0-9]{0,9}\.[A-Za-z0-9_-]+$"
SEALED_COLUMNS = [
    ("email_provider_configs", "encrypted_credentials"),
    ("email_provider_tokens", "encrypted_access_token"),
    ("email_provider_tokens", "encrypted_refresh_token"),
    ("email_provider_config_versions", "encrypted_credentials"),
]
KEYS = "tenant_data_keys"
# The colons are escaped for SQLAlchemy's text(), which would read ":v" as a parameter.
KEK_MATCHES = r"wrapped_key IS NULL OR wrapped_key ~ ('^[a-z]+\:v' || kek_version || '\:')"


def _check_name(table: str, column: str) -> str:
    return f"ck_{table}_{column}_sealed"


def upgrade() -> None:
    opts = options()
    name = qualified(FUNCTION)
    op.execute(
        f"""
        CREATE FUNCTION {name}(p_tenant_id text, p_config_id text)
        RETURNS TABLE (type text, version integer, config jsonb, encrypted_credentials text)
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        SET search_path = pg_catalog
        AS $$
        BEGIN
          PERFORM set_config('{TENANT_SETTING}', p_tenant_id, true);
          RETURN QUERY
            SELECT c.type, c.version, c.config, c.encrypted_credentials
            FROM {qualified("email_provider_configs")} c
            WHERE c.tenant_id = p_tenant_id AND c.id = p_config_id AND c.deleted_at IS NULL;
        END
        $$
        """
    )
    op.execute(
        f"COMMENT ON FUNCTION {name}(text, text) IS 'Scope the transaction to a tenant and read "
        "one live config''s type, version, config and sealed credentials (the load hot path; "
        "RLS applies).'"
    )
    op.execute(f"REVOKE ALL ON FUNCTION {name}(text, text) FROM PUBLIC")
    op.execute(f'GRANT EXECUTE ON FUNCTION {name}(text, text) TO "{opts.app_role}"')

    for table, column in SEALED_COLUMNS:
        check = _check_name(table, column)
        op.execute(
            f"ALTER TABLE {qualified(table)} ADD CONSTRAINT {check} "
            f"CHECK ({column} IS NULL OR {column} ~ '{SEALED}') NOT VALID"
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

    keys = qualified(KEYS)
    op.execute(
        f"ALTER TABLE {keys} ADD CONSTRAINT ck_{KEYS}_kek_version_matches CHECK ({KEK_MATCHES})"
    )
    op.add_column(
        KEYS,
        sa.Column(
            "seals",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Values sealed under this key so far (its AES-GCM nonce budget).",
        ),
        schema=opts.schema,
    )
    op.execute(f'GRANT UPDATE (seals) ON {keys} TO "{opts.app_role}"')
    op.add_column(
        "audit_chain_heads",
        sa.Column(
            "anchor_mac",
            sa.Text(),
            nullable=True,
            comment="The key provider's MAC of (tenant, first_seq, anchor_hash), made by "
            "retention: the database owner cannot move the chain's start unnoticed.",
        ),
        schema=opts.schema,
    )
    op.execute(f'REVOKE INSERT ON {keys} FROM "{opts.app_role}"')
    op.execute(
        f"GRANT INSERT (tenant_id, version, wrapped_key, kek_version) ON {keys} "
        f'TO "{opts.app_role}"'
    )


def blockers(opts: MigrationOptions) -> list[Blocker]:
    """What this downgrade would delete: how often each data key sealed (its nonce
    budget), and the authentication of where retention cut each audit chain."""
    return [
        Blocker(
            "data-key seal counters (each key's nonce budget)",
            f"FROM {schema_qualified(opts.schema, KEYS)} WHERE seals > 0",
        ),
        Blocker(
            "authenticated audit anchors (anchor_mac)",
            f"FROM {schema_qualified(opts.schema, 'audit_chain_heads')} "
            "WHERE anchor_mac IS NOT NULL",
        ),
    ]


def downgrade() -> None:
    opts = options()
    keys = qualified(KEYS)
    refuse_blocked(blockers(opts))
    op.execute(
        f"REVOKE INSERT (tenant_id, version, wrapped_key, kek_version) ON {keys} "
        f'FROM "{opts.app_role}"'
    )
    op.execute(f'GRANT INSERT ON {keys} TO "{opts.app_role}"')
    op.drop_column("audit_chain_heads", "anchor_mac", schema=opts.schema)
    op.execute(f'REVOKE UPDATE (seals) ON {keys} FROM "{opts.app_role}"')
    op.drop_column(KEYS, "seals", schema=opts.schema)
    op.execute(f"ALTER TABLE {keys} DROP CONSTRAINT ck_{KEYS}_kek_version_matches")
    for table, column in reversed(SEALED_COLUMNS):
        op.execute(f"ALTER TABLE {qualified(table)} DROP CONSTRAINT {_check_name(table, column)}")
    op.execute(f"DROP FUNCTION {qualified(FUNCTION)}(text, text)")
