"""Data: a default SendGrid config for each tenant that sends through SendGrid today.

Set-based and idempotent, unlike the ticket's CTE (which inserted again on a
second run and made every new config the default even where the tenant had
one): ON CONFLICT DO NOTHING skips tenants that already have the config, a
config is the default only where the tenant has none, and only unlinked
senders are linked. It reads nothing back, so it renders offline with --sql.
Legacy sender rows keep every value, updated_at included.

Senders are linked (and, downgrading, unlinked) in batches of
``SENDER_BATCH_ROWS`` by primary key, each batch its own transaction: a long
single UPDATE would hold every sender's row lock until the end, and
``lock_timeout`` does not bound how long the application then waits. A rerun
after an interruption links what is left.

Runs as the migrator role: the tables force row-level security, and a data
migration works across tenants.

Revision ID: 0004_default_sendgrid_configs
Revises: 0003_sender_identity_links
"""

from __future__ import annotations

from alembic import op

from tenantvault.migration_support import (
    LEGACY_SENDGRID_CONFIG,
    LEGACY_SENDGRID_NAME,
    as_migrator,
    in_batches_as_migrator,
    legacy_sendgrid_config,
    qualified,
)

revision = "0004_default_sendgrid_configs"
down_revision = "0003_sender_identity_links"
branch_labels = None
depends_on = None

TABLE = "email_sender_identities"
LEGACY_NAME = LEGACY_SENDGRID_NAME
LEGACY_CONFIG = LEGACY_SENDGRID_CONFIG  # marks the configs this migration made


def _is_legacy_config(alias: str) -> str:
    return legacy_sendgrid_config(alias)


def upgrade() -> None:
    configs = qualified("email_provider_configs")
    identities = qualified("email_sender_identities")
    with as_migrator():
        op.execute(
            f"""
            INSERT INTO {configs} (tenant_id, type, name, config, is_default, is_active)
            SELECT t.id, 'sendgrid', '{LEGACY_NAME}', '{LEGACY_CONFIG}'::jsonb,
                   NOT EXISTS (SELECT 1 FROM {configs} d WHERE d.tenant_id = t.id AND d.is_default),
                   true
            FROM {qualified("tenants")} t
            WHERE EXISTS (
                SELECT 1 FROM {identities} esi
                WHERE esi.tenant_id = t.id AND esi.sendgrid_sender_id IS NOT NULL
            )
            ON CONFLICT DO NOTHING
            """
        )
    # Linking touches every SendGrid sender: in batches, each committed at once, so the
    # application's own updates of a sender never wait long for its row lock.
    in_batches_as_migrator(
        TABLE,
        f"""
        UPDATE {identities} esi SET provider_config_id = c.id
        FROM {configs} c
        WHERE {{batch}} AND c.tenant_id = esi.tenant_id AND c.deleted_at IS NULL
          AND {_is_legacy_config("c")}
          AND esi.sendgrid_sender_id IS NOT NULL AND esi.provider_config_id IS NULL
        """,
    )


def downgrade() -> None:
    configs = qualified("email_provider_configs")
    identities = qualified("email_sender_identities")
    # No guard of its own: credentials stored since in these configs are sealed under
    # tenant data keys, and 0005's downgrade, which runs first, refused to delete those
    # keys unless the loss was accepted. What remains here could not be opened.
    in_batches_as_migrator(
        TABLE,
        f"""
        UPDATE {identities} esi SET provider_config_id = NULL
        FROM {configs} c
        WHERE {{batch}} AND c.tenant_id = esi.tenant_id AND c.id = esi.provider_config_id
          AND {_is_legacy_config("c")}
        """,
    )
    with as_migrator():
        op.execute(f"DELETE FROM {configs} c WHERE {_is_legacy_config('c')}")
