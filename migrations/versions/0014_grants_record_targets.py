"""The grants record names only the schema's own objects and tenantvault's roles.

``tenantvault_grants`` (0002) keeps the REVOKEs a downgrade runs to take back what
the revisions granted on the application's schema and tables. Its CHECK admitted
any single-privilege REVOKE: on any schema or relation (``pg_catalog.pg_authid``)
from any role (``postgres``), and a downgrade runs the statements as whoever runs
it. This revision replaces that CHECK (keeping its name) with one that admits only
a REVOKE of one privilege on the schema itself or on one of its relations (or a
column of one), from the app role or the migrator role: the statements
``grant_kept_apart`` writes.

A row recorded before (the looser CHECK admitted it) that the new one refuses
stops this upgrade, naming the statement, before anything changes: find out who
wrote it and delete it. Every downgrade also checks each recorded statement
against the same pattern in Python before it runs any (``tenantvault migrate
--downgrade`` before it changes anything), whatever the CHECK then says.

Downgrade: the CHECK as 0002 made it (no data lives in it).

Revision ID: 0014_grants_record_targets
Revises: 0013_open_config_bound_tokens
"""

from __future__ import annotations

from alembic import op

from tenantvault.migration_support import (
    GRANTS_CHECK,
    GRANTS_TABLE,
    REVOKE_PATTERN,
    options,
    qualified,
    tenantvault_revoke_pattern,
)

revision = "0014_grants_record_targets"
down_revision = "0013_open_config_bound_tokens"
branch_labels = None
depends_on = None


def _replace_check(pattern: str) -> None:
    table = qualified(GRANTS_TABLE)
    op.execute(
        "DO $$ DECLARE refused text; BEGIN\n"
        # A database upgraded before the record existed has none (see revoke_granted).
        f"  IF to_regclass('{table}') IS NULL THEN RETURN; END IF;\n"
        f"  SELECT revoke INTO refused FROM {table} WHERE revoke !~ '{pattern}' LIMIT 1;\n"
        "  IF refused IS NOT NULL THEN\n"
        # (No % placeholder: percent signs do not survive offline rendering.)
        f"    RAISE EXCEPTION USING MESSAGE = 'tenantvault: {table} holds a statement "
        "tenantvault does not write: ' || refused, HINT = 'Nothing was changed by this "
        "step. Find out who wrote that row, delete it, and rerun.';\n"
        "  END IF;\n"
        f"  ALTER TABLE {table} DROP CONSTRAINT {GRANTS_CHECK},\n"
        f"    ADD CONSTRAINT {GRANTS_CHECK} CHECK (revoke ~ '{pattern}');\n"
        "END $$"
    )


def upgrade() -> None:
    _replace_check(tenantvault_revoke_pattern(options()))


def downgrade() -> None:
    # Every row the new CHECK admitted meets the old one.
    _replace_check(REVOKE_PATTERN)
