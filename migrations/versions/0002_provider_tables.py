"""Provider tables: email_provider_configs and email_provider_tokens, isolated per tenant.

Differs from TICKET-007's SQL (docs/schema.md, "Where we differ from the ticket"):
ids default to tenantvault_new_id() (the deployed database has no
generate_cuid()); one default per tenant is a partial unique index (EXCLUDE
needs btree_gist and ignored soft delete); no index duplicates a unique
constraint's leading column; timestamps default to UTC, not the session's zone;
tokens carry tenant_id and reference their config by (tenant_id, id).

Revision ID: 0002_provider_tables
Revises: 0001_baseline
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from tenantvault.migration_support import (
    Blocker,
    MigrationOptions,
    create_grants_record,
    drop_grants_record,
    grant_kept_apart,
    isolate_tenant_table,
    legacy_sendgrid_config,
    options,
    qualified,
    refuse_blocked,
    revoke_granted,
    schema_qualified,
    set_lz4_compression,
)

revision = "0002_provider_tables"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

UTC_NOW = sa.text("timezone('utc', now())")
TABLES = ("email_provider_configs", "email_provider_tokens")


def _create_functions() -> None:
    op.execute(
        f"""
        CREATE FUNCTION {qualified("tenantvault_new_id")}() RETURNS text
        LANGUAGE sql VOLATILE PARALLEL SAFE
        AS $$ SELECT 'tv' || replace(gen_random_uuid()::text, '-', '') $$
        """
    )
    op.execute(
        f"COMMENT ON FUNCTION {qualified('tenantvault_new_id')}() IS "
        "'Row id for tenantvault tables: tv + 32 hex digits, as tenantvault.ids.new_id makes.'"
    )
    # updated_at is the database's to keep, whoever writes the row; created_at never moves.
    op.execute(
        f"""
        CREATE FUNCTION {qualified("tenantvault_touch_updated_at")}() RETURNS trigger
        LANGUAGE plpgsql
        AS $$ BEGIN
          NEW.updated_at := timezone('utc', now());
          NEW.created_at := OLD.created_at;
          RETURN NEW;
        END $$
        """
    )
    op.execute(
        f"COMMENT ON FUNCTION {qualified('tenantvault_touch_updated_at')}() IS "
        "'Trigger: keeps updated_at current (UTC) and created_at unchanged.'"
    )


def _create_roles() -> None:
    opts = options()
    # Roles are cluster-wide and may be shared with other databases, so they are
    # created when missing and never dropped by a downgrade.
    # The comments inside the blocks are for a reviewer of the rendered SQL (--sql).
    op.execute(
        "DO $$ BEGIN\n"
        "  -- The two roles, only where the cluster lacks them. Where a DBA made them\n"
        "  -- beforehand (docs/migration-guide.md, step 2: a least-privilege owner may\n"
        "  -- not CREATE ROLE), this block does nothing.\n"
        f"  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{opts.app_role}') THEN\n"
        f'    CREATE ROLE "{opts.app_role}" NOLOGIN;\n'
        "  END IF;\n"
        f"  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{opts.migrator_role}') THEN\n"
        f'    CREATE ROLE "{opts.migrator_role}" NOLOGIN;\n'
        "  END IF;\n"
        "END $$"
    )
    # The migration's owner switches to the migrator role for data migrations. Where
    # a DBA made the roles and granted the membership already, nothing is granted.
    # From PostgreSQL 16 the membership does not inherit, so the owner's ordinary
    # sessions stay bound by FORCE ROW LEVEL SECURITY and only SET ROLE crosses tenants.
    op.execute(
        "DO $$ BEGIN\n"
        "  -- The owner's membership in the migrator role (used only by SET ROLE), only\n"
        "  -- where it lacks one. Where a DBA granted it (docs/migration-guide.md, step 2)\n"
        "  -- this block does nothing; granting it here needs ADMIN on the role.\n"
        f"  IF NOT pg_has_role(current_user, '{opts.migrator_role}', 'MEMBER') THEN\n"
        "    IF current_setting('server_version_num')::int >= 160000 THEN\n"
        f"      EXECUTE 'GRANT \"{opts.migrator_role}\" TO CURRENT_USER WITH INHERIT FALSE';\n"
        "    ELSE\n"
        f'      GRANT "{opts.migrator_role}" TO CURRENT_USER;\n'
        "    END IF;\n"
        "  END IF;\n"
        "END $$"
    )


def _id_column() -> sa.Column[str]:
    return sa.Column(
        "id",
        sa.Text(),
        server_default=sa.text(f"{qualified('tenantvault_new_id')}()"),
        nullable=False,
        comment="Row id ('tv' + 32 hex digits).",
    )


def _timestamp_columns() -> list[sa.Column[object]]:
    return [
        sa.Column(
            "created_at",
            sa.DateTime(),
            server_default=UTC_NOW,
            nullable=False,
            comment="Creation time (UTC).",
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(),
            server_default=UTC_NOW,
            nullable=False,
            comment="Last change (UTC); maintained by a trigger.",
        ),
    ]


def _create_configs(schema: str) -> None:
    op.create_table(
        "email_provider_configs",
        _id_column(),
        sa.Column(
            "tenant_id",
            sa.Text(),
            nullable=False,
            comment="Owning tenant; row-level security admits only the transaction's tenant.",
        ),
        sa.Column(
            "type",
            sa.Text(),
            nullable=False,
            comment="Provider: sendgrid, smtp, microsoft_graph or google_workspace.",
        ),
        sa.Column(
            "name",
            sa.Text(),
            nullable=False,
            comment="Display name, unique among the tenant's live configs.",
        ),
        sa.Column(
            "config",
            postgresql.JSONB(),
            nullable=False,
            comment="Provider-specific non-secret configuration (JSON object).",
        ),
        sa.Column(
            "encrypted_credentials",
            sa.Text(),
            nullable=True,
            comment="Sealed secret credentials (AEAD, bound to tenant, column and row); "
            "never plaintext.",
        ),
        sa.Column(
            "is_default",
            sa.Boolean(),
            server_default=sa.text("false"),
            nullable=False,
            comment="The tenant's default config (at most one, live).",
        ),
        sa.Column(
            "is_active",
            sa.Boolean(),
            server_default=sa.text("true"),
            nullable=False,
            comment="False when deactivated: kept, but not used to send.",
        ),
        *_timestamp_columns(),
        sa.Column(
            "deleted_at",
            sa.DateTime(),
            nullable=True,
            comment="Soft-delete time (UTC); NULL while the config is live.",
        ),
        sa.PrimaryKeyConstraint("id", name="email_provider_configs_pkey"),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            [f"{schema}.tenants.id"],
            name="fk_email_provider_configs_tenant_id_tenants",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("tenant_id", "id", name="uq_email_provider_configs_tenant_id_id"),
        sa.CheckConstraint(
            "type IN ('sendgrid', 'smtp', 'microsoft_graph', 'google_workspace')",
            name=op.f("ck_email_provider_configs_type"),
        ),
        sa.CheckConstraint(
            "btrim(name) <> ''", name=op.f("ck_email_provider_configs_name_not_blank")
        ),
        sa.CheckConstraint(
            "jsonb_typeof(config) = 'object'",
            name=op.f("ck_email_provider_configs_config_is_object"),
        ),
        sa.CheckConstraint(
            "NOT is_default OR (is_active AND deleted_at IS NULL)",
            name=op.f("ck_email_provider_configs_default_is_live"),
        ),
        schema=schema,
        comment="Email provider configurations of tenants; credentials are sealed (AEAD).",
    )
    op.create_index(
        "uq_email_provider_configs_tenant_id_name_live",
        "email_provider_configs",
        ["tenant_id", "name"],
        unique=True,
        schema=schema,
        postgresql_where=sa.text("deleted_at IS NULL"),
    )
    op.create_index(
        "uq_email_provider_configs_tenant_id_default",
        "email_provider_configs",
        ["tenant_id"],
        unique=True,
        schema=schema,
        postgresql_where=sa.text("is_default"),
    )


def _create_tokens(schema: str) -> None:
    op.create_table(
        "email_provider_tokens",
        _id_column(),
        sa.Column(
            "tenant_id",
            sa.Text(),
            nullable=False,
            comment="Owning tenant (the config's); row-level security admits only the "
            "transaction's tenant.",
        ),
        sa.Column(
            "config_id", sa.Text(), nullable=False, comment="The config these tokens authorize."
        ),
        sa.Column(
            "encrypted_access_token",
            sa.Text(),
            nullable=True,
            comment="Sealed OAuth access token; never plaintext.",
        ),
        sa.Column(
            "encrypted_refresh_token",
            sa.Text(),
            nullable=True,
            comment="Sealed OAuth refresh token; never plaintext.",
        ),
        sa.Column(
            "token_type",
            sa.Text(),
            server_default=sa.text("'Bearer'::text"),
            nullable=False,
            comment="OAuth token type (normally Bearer).",
        ),
        sa.Column(
            "expires_at",
            sa.DateTime(),
            nullable=True,
            comment="Access token expiry (UTC); queryable for the refresher.",
        ),
        sa.Column(
            "scopes",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
            comment="Granted OAuth scopes.",
        ),
        *_timestamp_columns(),
        sa.PrimaryKeyConstraint("id", name="email_provider_tokens_pkey"),
        sa.ForeignKeyConstraint(
            ["tenant_id", "config_id"],
            [f"{schema}.email_provider_configs.tenant_id", f"{schema}.email_provider_configs.id"],
            name="fk_email_provider_tokens_config",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "tenant_id", "config_id", name="uq_email_provider_tokens_tenant_id_config_id"
        ),
        schema=schema,
        comment="OAuth tokens of email provider configs; tokens are sealed (AEAD).",
    )


def _grant() -> None:
    opts = options()
    configs, tokens = (qualified(t) for t in TABLES)
    # The schema and tenants are the application's: what they already allow stays, and
    # only what is granted here is recorded for the downgrade to revoke.
    create_grants_record()
    for role in (opts.app_role, opts.migrator_role):
        grant_kept_apart(revision, "USAGE", role)
    # Soft delete is an UPDATE: the application role never deletes configs.
    op.execute(f'GRANT SELECT, INSERT, UPDATE ON {configs} TO "{opts.app_role}"')
    op.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON {tokens} TO "{opts.app_role}"')
    op.execute(
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON {configs}, {tokens} TO "{opts.migrator_role}"'
    )
    grant_kept_apart(revision, "SELECT", opts.migrator_role, relation="tenants")


def upgrade() -> None:
    # ON DELETE SET NULL (column list), used by the next revision, needs PostgreSQL 15.
    op.execute(
        "DO $$ BEGIN\n"
        "  IF current_setting('server_version_num')::int < 150000 THEN\n"
        "    RAISE EXCEPTION 'tenantvault needs PostgreSQL 15 or later';\n"
        "  END IF;\n"
        "END $$"
    )
    schema = options().schema
    _create_functions()
    _create_roles()
    _create_configs(schema)
    _create_tokens(schema)
    set_lz4_compression("email_provider_configs", ["config", "encrypted_credentials"])
    set_lz4_compression(
        "email_provider_tokens", ["encrypted_access_token", "encrypted_refresh_token"]
    )
    for table in TABLES:
        isolate_tenant_table(table)
    _grant()


def blockers(opts: MigrationOptions) -> list[Blocker]:
    """What this downgrade would delete. The SendGrid defaults 0004 made are not
    counted: its downgrade removes them before this one runs."""
    configs, tokens = (schema_qualified(opts.schema, t) for t in TABLES)
    return [
        Blocker("OAuth tokens", f"FROM {tokens}"),
        Blocker(
            "email provider configs",
            f"FROM {configs} c WHERE NOT ({legacy_sendgrid_config('c')})",
        ),
    ]


def downgrade() -> None:
    opts = options()
    refuse_blocked(blockers(opts))
    revoke_granted(revision)
    drop_grants_record()
    op.drop_table("email_provider_tokens", schema=opts.schema)
    op.drop_table("email_provider_configs", schema=opts.schema)
    op.execute(f"DROP FUNCTION {qualified('tenantvault_touch_updated_at')}()")
    op.execute(f"DROP FUNCTION {qualified('tenantvault_new_id')}()")
