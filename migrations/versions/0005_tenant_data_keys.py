"""Tenant data keys: each tenant's DEK versions, stored only wrapped by the transit KEK.

Exactly one active key per tenant (a partial unique index); older ones stay
readable until nothing refers to them (retired), or are destroyed (crypto-shred:
the wrapped key is erased). Row-level security like the other tenantvault tables.
The application role may read keys and add a tenant's first one; only the
operator (rotation, shredding) changes them.

Revision ID: 0005_tenant_data_keys
Revises: 0004_default_sendgrid_configs
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tenantvault.migration_support import (
    Blocker,
    MigrationOptions,
    isolate_tenant_table,
    options,
    qualified,
    refuse_blocked,
    schema_qualified,
)

revision = "0005_tenant_data_keys"
down_revision = "0004_default_sendgrid_configs"
branch_labels = None
depends_on = None

TABLE = "tenant_data_keys"
UTC_NOW = sa.text("timezone('utc', now())")


def upgrade() -> None:
    opts = options()
    op.create_table(
        TABLE,
        sa.Column("tenant_id", sa.Text(), nullable=False, comment="Owning tenant; the RLS key."),
        sa.Column(
            "version", sa.Integer(), nullable=False, comment="DEK version, from 1 per tenant."
        ),
        sa.Column(
            "wrapped_key",
            sa.Text(),
            nullable=True,
            comment="The DEK encrypted by the transit KEK for this tenant; NULL once destroyed.",
        ),
        sa.Column(
            "kek_version",
            sa.Integer(),
            nullable=False,
            comment="Transit key version that wrapped wrapped_key.",
        ),
        sa.Column(
            "state",
            sa.Text(),
            server_default=sa.text("'active'::text"),
            nullable=False,
            comment="active (new values), retired (read only), destroyed (shredded).",
        ),
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
        sa.PrimaryKeyConstraint("tenant_id", "version", name="tenant_data_keys_pkey"),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            [f"{opts.schema}.tenants.id"],
            name="fk_tenant_data_keys_tenant_id_tenants",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(
            "state IN ('active', 'retired', 'destroyed')", name=op.f("ck_tenant_data_keys_state")
        ),
        sa.CheckConstraint("version >= 1", name=op.f("ck_tenant_data_keys_version_positive")),
        sa.CheckConstraint(
            "(state = 'destroyed') = (wrapped_key IS NULL)",
            name=op.f("ck_tenant_data_keys_destroyed_has_no_key"),
        ),
        schema=opts.schema,
        comment="Tenant data keys (DEKs), wrapped by the Vault transit KEK; never plaintext.",
    )
    op.create_index(
        "uq_tenant_data_keys_tenant_id_active",
        TABLE,
        ["tenant_id"],
        unique=True,
        schema=opts.schema,
        postgresql_where=sa.text("state = 'active'"),
    )
    isolate_tenant_table(TABLE)
    op.execute(f'GRANT SELECT, INSERT ON {qualified(TABLE)} TO "{opts.app_role}"')
    op.execute(
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON {qualified(TABLE)} TO "{opts.migrator_role}"'
    )


def blockers(opts: MigrationOptions) -> list[Blocker]:
    """What this downgrade would delete. Every sealed credential and token needs its
    tenant's data key, so this guard also stands for them: 0004's downgrade, which
    runs after this one, deletes the SendGrid defaults without asking again."""
    return [
        Blocker(
            "tenant data keys (every sealed credential and token would become unreadable)",
            f"FROM {schema_qualified(opts.schema, TABLE)}",
        )
    ]


def downgrade() -> None:
    opts = options()
    refuse_blocked(blockers(opts))
    op.drop_table(TABLE, schema=opts.schema)
