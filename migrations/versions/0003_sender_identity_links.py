"""Sender identities: link each to a provider config of its own tenant.

The ticket made sendgrid_sender_id nullable; the deployed column already is, so
nothing is emitted for it and the downgrade never adds a NOT NULL that did not
exist. The link is a composite foreign key on (tenant_id, provider_config_id):
a sender cannot point at another tenant's config, and deleting a config clears
only provider_config_id (SET NULL with a column list), never tenant_id.

email_sender_identities belongs to the application, whose other readers do not
set a tenant, so it gets no row-level security (docs/schema.md).

Revision ID: 0003_sender_identity_links
Revises: 0002_provider_tables
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from tenantvault.migration_support import (
    Blocker,
    MigrationOptions,
    grant_kept_apart,
    legacy_sendgrid_config,
    options,
    qualified,
    refuse_blocked,
    revoke_granted,
    schema_qualified,
    set_lz4_compression,
)

revision = "0003_sender_identity_links"
down_revision = "0002_provider_tables"
branch_labels = None
depends_on = None

TABLE = "email_sender_identities"


def upgrade() -> None:
    opts = options()
    identities = qualified(TABLE)
    # Nullable columns without defaults: a catalog-only change, no table rewrite.
    op.add_column(
        TABLE,
        sa.Column(
            "provider_config_id",
            sa.Text(),
            nullable=True,
            comment="The email provider config this sender sends through "
            "(NULL: legacy SendGrid path).",
        ),
        schema=opts.schema,
    )
    op.add_column(
        TABLE,
        sa.Column(
            "provider_validation_data",
            postgresql.JSONB(),
            nullable=True,
            comment="Provider-specific validation data (identity id, verification URLs, ...); "
            "not secret.",
        ),
        schema=opts.schema,
    )
    set_lz4_compression(TABLE, ["provider_validation_data"])
    op.execute(
        f"ALTER TABLE {identities} ADD CONSTRAINT fk_email_sender_identities_provider_config "
        f"FOREIGN KEY (tenant_id, provider_config_id) "
        f"REFERENCES {qualified('email_provider_configs')} (tenant_id, id) "
        "ON DELETE SET NULL (provider_config_id)"
    )
    # Serves "the senders of a config" and the foreign key's ON DELETE lookups.
    op.create_index(
        "ix_email_sender_identities_tenant_id_provider_config_id",
        TABLE,
        ["tenant_id", "provider_config_id"],
        schema=opts.schema,
    )
    # tenantvault reads the link and writes only the columns it added.
    # On the columns added here: they go with the columns.
    op.execute(
        f"GRANT SELECT (provider_config_id, provider_validation_data), "
        f"UPDATE (provider_config_id, provider_validation_data) ON {identities} "
        f'TO "{opts.app_role}"'
    )
    op.execute(f'GRANT UPDATE (provider_config_id) ON {identities} TO "{opts.migrator_role}"')
    # On the application's own columns: recorded, so the downgrade revokes only these.
    for column in ("id", "tenant_id"):
        grant_kept_apart(revision, "SELECT", opts.app_role, relation=TABLE, column=column)
    grant_kept_apart(revision, "SELECT", opts.migrator_role, relation=TABLE)


def blockers(opts: MigrationOptions) -> list[Blocker]:
    """What this downgrade would delete. Links to the SendGrid defaults are not
    counted: 0004's downgrade removes them before this one runs."""
    identities = schema_qualified(opts.schema, TABLE)
    configs = schema_qualified(opts.schema, "email_provider_configs")
    return [
        Blocker(
            "sender links to provider configs (provider_config_id)",
            f"FROM {identities} s WHERE s.provider_config_id IS NOT NULL AND NOT EXISTS ("
            f"SELECT FROM {configs} c WHERE c.tenant_id = s.tenant_id "
            f"AND c.id = s.provider_config_id AND {legacy_sendgrid_config('c')})",
        ),
        Blocker(
            "sender validation data (provider_validation_data)",
            f"FROM {identities} WHERE provider_validation_data IS NOT NULL",
        ),
    ]


def downgrade() -> None:
    opts = options()
    refuse_blocked(blockers(opts))
    revoke_granted(revision)
    op.drop_index(
        "ix_email_sender_identities_tenant_id_provider_config_id", TABLE, schema=opts.schema
    )
    op.drop_constraint("fk_email_sender_identities_provider_config", TABLE, schema=opts.schema)
    op.drop_column(TABLE, "provider_validation_data", schema=opts.schema)
    op.drop_column(TABLE, "provider_config_id", schema=opts.schema)
