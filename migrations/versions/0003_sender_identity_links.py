"""Sender identities: link each to a provider config of its own tenant.

The ticket made sendgrid_sender_id nullable; the deployed column already is, so
nothing is emitted for it and the downgrade never adds a NOT NULL that did not
exist. The link is a composite foreign key on (tenant_id, provider_config_id):
a sender cannot point at another tenant's config, and deleting a config clears
only provider_config_id (SET NULL with a column list), never tenant_id.

email_sender_identities belongs to the application, whose other readers do not
set a tenant, so it gets no row-level security (docs/schema.md).

Online on a large table: the columns and the key (NOT VALID) are catalog-only
changes, made under ACCESS EXCLUSIVE in a transaction that reads no row; then,
outside it, the key is validated and the index built CONCURRENTLY, neither of
which keeps the application from reading or writing senders
(docs/migration-guide.md, "Locks and durations"). If one of those two stops (a
lock timeout, a cancel), the first part stays committed and the database stays at
0002: a rerun makes the key and the index again, hence the IF [NOT] EXISTS.

This revision changed after databases had run it: it used to make the key and
the index inside its transaction, holding ACCESS EXCLUSIVE while both scanned the
table. Changing an applied revision is sound only because the end state is
identical, catalog for catalog (a validated key, a valid index, the same names,
column order, comments, compression and grants; compared at this revision and at
the head): those databases need nothing, and get nothing.

Revision ID: 0003_sender_identity_links
Revises: 0002_provider_tables
"""

from __future__ import annotations

from alembic import op

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
FOREIGN_KEY = "fk_email_sender_identities_provider_config"
INDEX = "ix_email_sender_identities_tenant_id_provider_config_id"


def upgrade() -> None:
    opts = options()
    identities = qualified(TABLE)
    # First the catalog-only changes, in the revision's transaction: ADD COLUMN takes
    # ACCESS EXCLUSIVE (reads wait too) until that transaction commits, so nothing in it
    # reads the table. Each is rerunnable (see the module docstring).
    op.execute(f"ALTER TABLE {identities} ADD COLUMN IF NOT EXISTS provider_config_id text")
    op.execute(
        f"COMMENT ON COLUMN {identities}.provider_config_id IS 'The email provider config "
        "this sender sends through (NULL: legacy SendGrid path).'"
    )
    op.execute(f"ALTER TABLE {identities} ADD COLUMN IF NOT EXISTS provider_validation_data jsonb")
    op.execute(
        f"COMMENT ON COLUMN {identities}.provider_validation_data IS 'Provider-specific "
        "validation data (identity id, verification URLs, ...); not secret.'"
    )
    set_lz4_compression(TABLE, ["provider_validation_data"])
    # What an interrupted earlier run left: an index a concurrent build left invalid,
    # a key not yet validated. Both are made again below.
    op.execute(f"DROP INDEX IF EXISTS {qualified(INDEX)}")
    op.execute(f"ALTER TABLE {identities} DROP CONSTRAINT IF EXISTS {FOREIGN_KEY}")
    # NOT VALID: checked for new rows at once, for the existing ones below.
    op.execute(
        f"ALTER TABLE {identities} ADD CONSTRAINT {FOREIGN_KEY} "
        f"FOREIGN KEY (tenant_id, provider_config_id) "
        f"REFERENCES {qualified('email_provider_configs')} (tenant_id, id) "
        "ON DELETE SET NULL (provider_config_id) NOT VALID"
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
    _scan_online(identities)


def _scan_online(identities: str) -> None:
    """The two steps that read every sender, after the revision's transaction commits:
    validating the key takes SHARE UPDATE EXCLUSIVE (and ROW SHARE on the configs),
    the concurrent index build SHARE UPDATE EXCLUSIVE, so the application's reads and
    writes of senders go on throughout. On a caller's connection, whose transactions
    are the caller's, both run in its transaction (a plain index build): the same
    catalog, the locks of a single transaction."""
    validate = f"ALTER TABLE {identities} VALIDATE CONSTRAINT {FOREIGN_KEY}"
    # Serves "the senders of a config" and the foreign key's ON DELETE lookups.
    on = f"{INDEX} ON {identities} (tenant_id, provider_config_id)"
    if not options().commit_batches:
        op.execute(validate)
        op.execute(f"CREATE INDEX {on}")
        return
    with op.get_context().autocommit_block():
        op.execute(validate)
        op.execute(f"CREATE INDEX CONCURRENTLY {on}")


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
    op.drop_index(INDEX, TABLE, schema=opts.schema)
    op.drop_constraint(FOREIGN_KEY, TABLE, schema=opts.schema)
    op.drop_column(TABLE, "provider_validation_data", schema=opts.schema)
    op.drop_column(TABLE, "provider_config_id", schema=opts.schema)
