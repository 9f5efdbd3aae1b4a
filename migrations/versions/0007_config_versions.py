"""Config versions and key rotation: every config change is a kept, versioned row.

- ``email_provider_configs.version`` counts changes (optimistic concurrency:
  callers may pass the version they read, and a write refuses if it moved on).
- ``email_provider_config_versions`` keeps each version's non-secret config and
  its sealed credentials (sealed again for this table, bound to the version),
  with actor, reason and time. Existing configs get their current state as
  version 1, without credentials: those were never versioned.
- ``tenant_data_keys.state`` gains ``draining``: a key superseded by a newer
  active key whose values DEK rotation is still re-sealing. It opens values like
  a retired key; rotation marks it ``retired`` once nothing refers to it.

Revision ID: 0007_config_versions
Revises: 0006_load_credentials_function
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tenantvault.migration_support import (
    Blocker,
    MigrationOptions,
    as_migrator,
    isolate_tenant_table,
    options,
    qualified,
    refuse_blocked,
    schema_qualified,
    set_lz4_compression,
)

revision = "0007_config_versions"
down_revision = "0006_load_credentials_function"
branch_labels = None
depends_on = None

CONFIGS = "email_provider_configs"
VERSIONS = "email_provider_config_versions"
KEYS = "tenant_data_keys"
UTC_NOW = sa.text("timezone('utc', now())")
OLD_STATES_COMMENT = "active (new values), retired (read only), destroyed (shredded)."
STATES_COMMENT = (
    "active (new values), draining (superseded, being re-sealed), retired (read only), "
    "destroyed (shredded)."
)
CHANGES = "'created', 'updated', 'credentials', 'rollback', 'baseline'"


def _create_versions(schema: str) -> None:
    op.create_table(
        VERSIONS,
        sa.Column("tenant_id", sa.Text(), nullable=False, comment="Owning tenant; the RLS key."),
        sa.Column(
            "config_id", sa.Text(), nullable=False, comment="The config this is a version of."
        ),
        sa.Column("version", sa.Integer(), nullable=False, comment="The config's version number."),
        sa.Column(
            "change",
            sa.Text(),
            nullable=False,
            comment="What this version changed: created, updated, credentials, rollback, "
            "or baseline (recorded when versioning was installed).",
        ),
        sa.Column("name", sa.Text(), nullable=False, comment="The config's name at this version."),
        sa.Column(
            "config",
            sa.dialects.postgresql.JSONB(),
            nullable=False,
            comment="The non-secret configuration at this version.",
        ),
        sa.Column(
            "encrypted_credentials",
            sa.Text(),
            nullable=True,
            comment="Sealed credentials of this version (bound to this row); NULL when "
            "there were none, or pruned by retention.",
        ),
        sa.Column(
            "actor",
            sa.Text(),
            nullable=True,
            comment="Who made the change (as the caller named it, e.g. user:42).",
        ),
        sa.Column("reason", sa.Text(), nullable=True, comment="Why, as the caller gave it."),
        sa.Column(
            "created_at",
            sa.DateTime(),
            server_default=UTC_NOW,
            nullable=False,
            comment="When this version was written (UTC).",
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(),
            server_default=UTC_NOW,
            nullable=False,
            comment="Last change (re-sealed or pruned; UTC); maintained by a trigger.",
        ),
        sa.PrimaryKeyConstraint(
            "tenant_id", "config_id", "version", name="email_provider_config_versions_pkey"
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "config_id"],
            [f"{schema}.{CONFIGS}.tenant_id", f"{schema}.{CONFIGS}.id"],
            name="fk_email_provider_config_versions_config",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(f"change IN ({CHANGES})", name=op.f(f"ck_{VERSIONS}_change")),
        sa.CheckConstraint("version >= 1", name=op.f(f"ck_{VERSIONS}_version_positive")),
        schema=schema,
        comment="Every version of every email provider config: non-secret config, sealed "
        "credentials, actor, reason, time.",
    )


def _set_key_states(states: str, comment: str) -> None:
    name = op.f(f"ck_{KEYS}_state")
    op.drop_constraint(name, KEYS, schema=options().schema, type_="check")
    op.create_check_constraint(name, KEYS, f"state IN ({states})", schema=options().schema)
    op.execute(f"COMMENT ON COLUMN {qualified(KEYS)}.state IS '{comment}'")


def upgrade() -> None:
    opts = options()
    op.add_column(
        CONFIGS,
        sa.Column(
            "version",
            sa.Integer(),
            server_default=sa.text("1"),
            nullable=False,
            comment="Change counter: +1 on every change; each version is kept in "
            "email_provider_config_versions.",
        ),
        schema=opts.schema,
    )
    op.create_check_constraint(
        op.f(f"ck_{CONFIGS}_version_positive"), CONFIGS, "version >= 1", schema=opts.schema
    )
    _create_versions(opts.schema)
    # Retention finds the versions still holding a secret without walking a config's
    # whole history: at most the kept number (plus one) are in this index.
    op.create_index(
        f"ix_{VERSIONS}_with_credentials",
        VERSIONS,
        ["tenant_id", "config_id", "version"],
        schema=opts.schema,
        postgresql_where=sa.text("encrypted_credentials IS NOT NULL"),
    )
    set_lz4_compression(VERSIONS, ["config", "encrypted_credentials"])
    isolate_tenant_table(VERSIONS)
    op.execute(f'GRANT SELECT, INSERT, UPDATE ON {qualified(VERSIONS)} TO "{opts.app_role}"')
    op.execute(
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON {qualified(VERSIONS)} TO "{opts.migrator_role}"'
    )
    with as_migrator():
        op.execute(
            f"INSERT INTO {qualified(VERSIONS)} "
            "(tenant_id, config_id, version, change, name, config, reason) "
            f"SELECT tenant_id, id, version, 'baseline', name, config, "
            "'recorded by migration 0007; credentials were not versioned before' "
            f"FROM {qualified(CONFIGS)}"
        )
    _set_key_states("'active', 'draining', 'retired', 'destroyed'", STATES_COMMENT)


def blockers(opts: MigrationOptions) -> list[Blocker]:
    """What this downgrade would delete: the baseline versions it made itself are not."""
    return [
        Blocker(
            "config versions (the history of configs and their sealed credentials)",
            f"FROM {schema_qualified(opts.schema, VERSIONS)} WHERE change <> 'baseline'",
        )
    ]


def downgrade() -> None:
    opts = options()
    refuse_blocked(blockers(opts))
    with as_migrator():
        # A draining key opens its values just as a retired one does.
        op.execute(f"UPDATE {qualified(KEYS)} SET state = 'retired' WHERE state = 'draining'")
    _set_key_states("'active', 'retired', 'destroyed'", OLD_STATES_COMMENT)
    op.drop_table(VERSIONS, schema=opts.schema)
    op.drop_constraint(
        op.f(f"ck_{CONFIGS}_version_positive"), CONFIGS, schema=opts.schema, type_="check"
    )
    op.drop_column(CONFIGS, "version", schema=opts.schema)
