"""A revoked OAuth grant is a state of its token row, and an audited action.

- ``email_provider_tokens.reconsent_required_at``: set when the provider answered a
  refresh with ``invalid_grant`` (the user revoked the grant, or it expired unused);
  NULL otherwise. While set, tenantvault sends no refresh for the row (a revoked
  refresh token stays revoked: retrying it is a loop); storing a new grant
  (``complete_authorization``, ``store_oauth_token``) clears it. A nullable column
  without a default: a catalog change only, nothing rewritten. The application role
  keeps its table-wide UPDATE on the table (0002), which covers the column; the
  replay guards of 0015 are untouched: marking the row changes neither its version
  nor a sealed value.
- The audit log's actions gain ``token.reconsent_required``. As in 0018, the CHECK
  is replaced NOT VALID and validated after the revision's transaction commits
  (SHARE UPDATE EXCLUSIVE), or in the caller's transaction when the migration runs
  in one.

Downgrade: refused while the audit log holds a ``token.reconsent_required`` event
(the narrower CHECK would not validate, and the log is append-only); otherwise the
CHECK is restored and the column dropped (code older than this revision would
refresh a revoked grant again: nothing is lost but the mark).

Revision ID: 0019_oauth_reconsent
Revises: 0018_kek_references
"""

from __future__ import annotations

from alembic import op

from tenantvault.migration_support import (
    Blocker,
    MigrationOptions,
    options,
    qualified,
    refuse_blocked,
    replace_audit_action_check,
    schema_qualified,
)

revision = "0019_oauth_reconsent"
down_revision = "0018_kek_references"
branch_labels = None
depends_on = None

TOKENS = "email_provider_tokens"
COLUMN = "reconsent_required_at"
AUDIT = "audit_events"
RECONSENT = "token.reconsent_required"
ACTIONS_0018 = (
    "config.created",
    "config.updated",
    "config.credentials_stored",
    "config.rolled_back",
    "config.default_set",
    "config.deactivated",
    "config.deleted",
    "config.restored",
    "config.purged",
    "credentials.revealed",
    "token.stored",
    "token.refreshed",
    "token.deleted",
    "dek.created",
    "dek.rotated",
    "dek.retired",
    "dek.destroyed",
    "kek.rewrapped",
    "kek.tenant_set",
)
ACTIONS = (*ACTIONS_0018, RECONSENT)


def upgrade() -> None:
    tokens = qualified(TOKENS)
    op.execute(f"ALTER TABLE {tokens} ADD COLUMN {COLUMN} timestamp")
    op.execute(
        f"COMMENT ON COLUMN {tokens}.{COLUMN} IS 'When the provider refused a refresh with "
        "invalid_grant (UTC): no refresh is sent until a new grant is stored; NULL otherwise.'"
    )
    replace_audit_action_check(ACTIONS)


def blockers(opts: MigrationOptions) -> list[Blocker]:
    """What this downgrade would lose: audit events of the action it adds, which the
    older CHECK refuses and an append-only log cannot drop."""
    return [
        Blocker(
            f"the audit log's {RECONSENT} events (the log is append-only)",
            f"FROM {schema_qualified(opts.schema, AUDIT)} WHERE action = '{RECONSENT}'",
        ),
    ]


def downgrade() -> None:
    refuse_blocked(blockers(options()))
    replace_audit_action_check(ACTIONS_0018)
    op.execute(f"ALTER TABLE {qualified(TOKENS)} DROP COLUMN {COLUMN}")
