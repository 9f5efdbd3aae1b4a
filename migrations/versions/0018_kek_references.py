"""Every data key names the KEK that wrapped it; a tenant may have a KEK of its own.

- ``tenant_data_keys.kek_ref``: the KEK of the row's wrapped key as a reference
  (``transit:<key>``, ``awskms:<key id or ARN>``). Until now one KEK, the
  deployment's, wrapped every key, so the column is added with that KEK as its
  default (``Settings.default_kek_ref`` of the process that migrates): PostgreSQL
  stores a constant default in the catalog and every existing row reads it, so
  nothing is rewritten and nothing re-wrapped, and the lock (ACCESS EXCLUSIVE) is
  held only for the catalog change. A process older than this revision that inserts
  a tenant's first key meanwhile gets the same default, which is the KEK it used.
  The format CHECK is added NOT VALID and validated apart (SHARE UPDATE EXCLUSIVE).
  The application role may insert the column (a tenant's first key names its KEK).
- ``tenant_keks``: the KEK a tenant chose (a customer-managed key), and how long its
  unwrapped data keys may stay cached (the revocation delay). The application role
  reads its own tenant's row; only the migrator role (``tenantvault tenant-key``)
  writes.
- ``tenantvault_usable_data_keys(tenants)`` (0012, fleet warm-up) also returns each
  key's KEK and its tenant's cache age, so a warm-up asks each KEK for its own keys.
- The audit log's actions gain ``kek.tenant_set`` (a tenant's KEK chosen or reset).
  The CHECK is replaced NOT VALID (every existing row passed the narrower one) and
  validated after the revision's transaction commits, under SHARE UPDATE EXCLUSIVE,
  so the audit log's writers never wait for the scan.

Downgrade: refused while a data key sits under a KEK other than the deployment's
(the older code would unwrap it with the wrong one): run ``tenantvault tenant-key
unset`` for those tenants first, or acknowledge the loss. Then the function is
restored, the table and the column dropped.

Revision ID: 0018_kek_references
Revises: 0017_lean_hot_functions
"""

from __future__ import annotations

from alembic import op

from tenantvault.db import TENANT_SETTING
from tenantvault.db.models import KEK_REF_PATTERN
from tenantvault.migration_support import (
    Blocker,
    MigrationOptions,
    isolate_tenant_table,
    options,
    qualified,
    refuse_blocked,
    revoke_foreign_function_privileges,
    revoke_foreign_privileges,
    schema_qualified,
)

revision = "0018_kek_references"
down_revision = "0017_lean_hot_functions"
branch_labels = None
depends_on = None

KEYS = "tenant_data_keys"
TENANT_KEKS = "tenant_keks"
FUNCTION = "tenantvault_usable_data_keys"
# As 0010: a BYPASSRLS role's SELECT (a backup login's) stays.
BACKUP_READ = (
    "(a.privilege_type = 'SELECT' AND "
    "COALESCE((SELECT rolbypassrls FROM pg_roles WHERE oid = a.grantee), false))"
)


AUDIT = "audit_events"
ACTIONS_0008 = (
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
)
ACTIONS = (*ACTIONS_0008, "kek.tenant_set")


def _replace_actions_check(actions: tuple[str, ...]) -> None:
    """The audit log's action CHECK, now listing ``actions``: added NOT VALID in the
    revision's transaction, validated after it commits (SHARE UPDATE EXCLUSIVE), so the
    scan of the log never holds up its writers."""
    audit = qualified(AUDIT)
    op.execute(f"ALTER TABLE {audit} DROP CONSTRAINT ck_{AUDIT}_action")
    listed = ", ".join(f"'{action}'" for action in actions)
    op.execute(
        f"ALTER TABLE {audit} ADD CONSTRAINT ck_{AUDIT}_action CHECK (action IN ({listed})) "
        "NOT VALID"
    )
    validate = f"ALTER TABLE {audit} VALIDATE CONSTRAINT ck_{AUDIT}_action"
    if not options().commit_batches:  # on a caller's connection: its transaction
        op.execute(validate)
        return
    with op.get_context().autocommit_block():
        op.execute(validate)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _usable_keys_function(columns: str, extra: str, join: str) -> str:
    """0012's function, with ``columns`` returned and ``extra`` selected after the three
    it always had (0012's own text is this with both empty)."""
    keys = qualified(KEYS)
    return f"""
        CREATE FUNCTION {qualified(FUNCTION)}(p_tenant_ids text[])
        RETURNS TABLE (tenant_id text, version integer, wrapped_key text{columns})
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        SET search_path = pg_catalog
        AS $$
        DECLARE
          v_tenant text;
        BEGIN
          FOREACH v_tenant IN ARRAY p_tenant_ids LOOP
            PERFORM set_config('{TENANT_SETTING}', v_tenant, true);
            RETURN QUERY
              SELECT k.tenant_id, k.version, k.wrapped_key{extra}
              FROM {keys} k{join}
              WHERE k.tenant_id = v_tenant AND k.state IN ('active', 'draining')
              ORDER BY k.version;
          END LOOP;
          PERFORM set_config('{TENANT_SETTING}', '', true);
        END
        $$
        """


def _replace_function(columns: str, extra: str, join: str, comment: str) -> None:
    opts = options()
    name = qualified(FUNCTION)
    op.execute(f"DROP FUNCTION {name}(text[])")
    op.execute(_usable_keys_function(columns, extra, join))
    op.execute(f"COMMENT ON FUNCTION {name}(text[]) IS {_literal(comment)}")
    op.execute(f"REVOKE ALL ON FUNCTION {name}(text[]) FROM PUBLIC")
    op.execute(f'GRANT EXECUTE ON FUNCTION {name}(text[]) TO "{opts.app_role}"')
    revoke_foreign_function_privileges()


def upgrade() -> None:
    opts = options()
    keys, tenant_keks = qualified(KEYS), qualified(TENANT_KEKS)
    op.execute(
        f"ALTER TABLE {keys} ADD COLUMN kek_ref text NOT NULL "
        f"DEFAULT {_literal(opts.default_kek_ref)}"
    )
    op.execute(
        f"ALTER TABLE {keys} ADD CONSTRAINT ck_{KEYS}_kek_ref_format "
        f"CHECK (kek_ref ~ '{KEK_REF_PATTERN}') NOT VALID"
    )
    op.execute(f"ALTER TABLE {keys} VALIDATE CONSTRAINT ck_{KEYS}_kek_ref_format")
    op.execute(
        f"COMMENT ON COLUMN {keys}.kek_ref IS 'The KEK that wrapped wrapped_key: "
        "transit:<key> or awskms:<key id or ARN>.'"
    )
    op.execute(f'GRANT INSERT (kek_ref) ON {keys} TO "{opts.app_role}"')
    _key_comments(
        "Tenant data keys (DEKs), wrapped by a KEK; never plaintext.",
        "The DEK encrypted by the KEK kek_ref for this tenant; NULL once destroyed.",
        "Version of the KEK that wrapped wrapped_key.",
    )

    op.execute(
        f"""
        CREATE TABLE {tenant_keks} (
          tenant_id text NOT NULL,
          kek_ref text NOT NULL,
          cache_max_age_seconds integer,
          created_at timestamp NOT NULL DEFAULT timezone('utc', now()),
          updated_at timestamp NOT NULL DEFAULT timezone('utc', now()),
          CONSTRAINT {TENANT_KEKS}_pkey PRIMARY KEY (tenant_id),
          CONSTRAINT fk_{TENANT_KEKS}_tenant_id_tenants FOREIGN KEY (tenant_id)
            REFERENCES {qualified("tenants")} (id) ON DELETE CASCADE,
          CONSTRAINT ck_{TENANT_KEKS}_kek_ref_format CHECK (kek_ref ~ '{KEK_REF_PATTERN}'),
          CONSTRAINT ck_{TENANT_KEKS}_cache_max_age_positive
            CHECK (cache_max_age_seconds IS NULL OR cache_max_age_seconds > 0)
        )
        """
    )
    comments = {
        None: "Per-tenant KEKs (customer-managed keys); operators write, the app reads.",
        "tenant_id": "The tenant; the RLS key.",
        "kek_ref": "The tenant's KEK: transit:<key> or awskms:<key id or ARN>.",
        "cache_max_age_seconds": "How long an unwrapped data key of this tenant is cached "
        "at most (the revocation delay); NULL: the deployment's "
        "TENANTVAULT_DEK_CACHE_MAX_AGE_SECONDS.",
        "created_at": "Creation time (UTC).",
        "updated_at": "Last change (UTC); maintained by a trigger.",
    }
    for column, text in comments.items():
        target = tenant_keks if column is None else f"{tenant_keks}.{column}"
        kind = "TABLE" if column is None else "COLUMN"
        op.execute(f"COMMENT ON {kind} {target} IS {_literal(text)}")
    isolate_tenant_table(TENANT_KEKS)
    revoke_foreign_privileges(f"c.oid = '{tenant_keks}'::regclass", kept=BACKUP_READ)
    op.execute(f'GRANT SELECT ON {tenant_keks} TO "{opts.app_role}"')
    op.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON {tenant_keks} TO "{opts.migrator_role}"')

    _replace_function(
        ", kek_ref text, cache_max_age_seconds integer",
        ", k.kek_ref, t.cache_max_age_seconds",
        f" LEFT JOIN {tenant_keks} t ON t.tenant_id = k.tenant_id",
        "For each tenant in turn, scope the transaction to it and read its active and "
        "draining data keys, wrapped, with their KEK and the tenant's cache age (fleet "
        "warm-up; RLS applies to every read); the tenant setting is cleared at the end.",
    )
    _replace_actions_check(ACTIONS)


def _key_comments(table: str, wrapped_key: str, kek_version: str) -> None:
    keys = qualified(KEYS)
    op.execute(f"COMMENT ON TABLE {keys} IS {_literal(table)}")
    op.execute(f"COMMENT ON COLUMN {keys}.wrapped_key IS {_literal(wrapped_key)}")
    op.execute(f"COMMENT ON COLUMN {keys}.kek_version IS {_literal(kek_version)}")


def blockers(opts: MigrationOptions) -> list[Blocker]:
    """What this downgrade would lose: data keys wrapped by a KEK other than the
    deployment's, which code older than this revision would unwrap with the wrong KEK."""
    return [
        Blocker(
            "the KEK references of data keys under tenant KEKs (run `tenantvault "
            "tenant-key unset` for those tenants first)",
            f"FROM {schema_qualified(opts.schema, KEYS)} "
            f"WHERE kek_ref <> {_literal(opts.default_kek_ref)} AND wrapped_key IS NOT NULL",
        ),
    ]


def downgrade() -> None:
    opts = options()
    refuse_blocked(blockers(opts))
    _replace_function(
        "",
        "",
        "",
        "For each tenant in turn, scope the transaction to it and read its active and "
        "draining data keys, wrapped (fleet warm-up; RLS applies to every read); the "
        "tenant setting is cleared at the end.",
    )
    _replace_actions_check(ACTIONS_0008)
    op.execute(f"DROP TABLE {qualified(TENANT_KEKS)}")
    op.execute(f'REVOKE INSERT (kek_ref) ON {qualified(KEYS)} FROM "{opts.app_role}"')
    op.execute(f"ALTER TABLE {qualified(KEYS)} DROP COLUMN kek_ref")
    _key_comments(
        "Tenant data keys (DEKs), wrapped by the Vault transit KEK; never plaintext.",
        "The DEK encrypted by the transit KEK for this tenant; NULL once destroyed.",
        "Transit key version that wrapped wrapped_key.",
    )
