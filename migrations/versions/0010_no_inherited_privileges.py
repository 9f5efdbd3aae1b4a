"""No privilege on tenantvault's objects but the ones tenantvault grants.

A schema may carry default privileges (``ALTER DEFAULT PRIVILEGES ... GRANT ...
ON TABLES TO ...``), as hosting platforms and some ORMs set up. Each table
tenantvault creates would then also be granted to those roles: DELETE on configs
or the audit log to an application login, or direct access to an audit
partition, which has no row-level security of its own. This revision:

- revokes, on tenantvault's tables, the audit log's partitions, the chain heads
  and the grants record, every privilege held by a role other than the owner,
  the app role and the migrator role (PUBLIC included), except SELECT held by a
  BYPASSRLS role (a backup login, docs/backup.md: through the parent tables it
  reads every tenant's rows already);
- revokes EXECUTE on tenantvault's functions from every role but those three
  and PUBLIC (what PostgreSQL grants by default, and what earlier revisions
  revoked where it mattered);
- makes ``tenantvault_audit_add_partitions`` do the same for each partition it
  creates later.

Downgrade: the partition function as 0008 made it. Nothing is granted back:
those privileges were never tenantvault's to give.

Revision ID: 0010_no_inherited_privileges
Revises: 0009_sealed_bindings
"""

from __future__ import annotations

from alembic import op

from tenantvault.migration_support import (
    GRANTS_TABLE,
    audit_partitions_function,
    options,
    revoke_foreign_function_privileges,
    revoke_foreign_privileges,
)

revision = "0010_no_inherited_privileges"
down_revision = "0009_sealed_bindings"
branch_labels = None
depends_on = None

AUDIT = "audit_events"
# A backup login's read (docs/backup.md): SELECT by a BYPASSRLS role, which reads every
# tenant through the parent tables anyway.
BACKUP_READ = (
    "(a.privilege_type = 'SELECT' AND "
    "COALESCE((SELECT rolbypassrls FROM pg_roles WHERE oid = a.grantee), false))"
)
TABLES = (
    "email_provider_configs",
    "email_provider_tokens",
    "email_provider_config_versions",
    "email_provider_usage",
    "audit_events",
    "audit_chain_heads",
    "tenant_data_keys",
    GRANTS_TABLE,
)


def upgrade() -> None:
    opts = options()
    schema = opts.schema
    ours = f"to_regrole('{opts.app_role}'), to_regrole('{opts.migrator_role}')"
    names = ", ".join(f"'{t}'" for t in TABLES)
    revoke_foreign_privileges(
        f"c.relnamespace = '\"{schema}\"'::regnamespace AND (c.relname IN ({names}) "
        f"OR c.oid IN (SELECT inhrelid FROM pg_inherits "
        f"WHERE inhparent = '\"{schema}\".{AUDIT}'::regclass))",
        kept=f"a.grantee IN ({ours}) OR {BACKUP_READ}",
    )
    revoke_foreign_function_privileges()
    op.execute("CREATE OR REPLACE " + audit_partitions_function(schema, AUDIT, private=True))


def downgrade() -> None:
    op.execute("CREATE OR REPLACE " + audit_partitions_function(options().schema, AUDIT))
