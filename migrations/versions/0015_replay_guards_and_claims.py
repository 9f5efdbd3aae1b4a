"""Whole-row replay refused by the database; operator claims the application cannot take.

Replay (an application-role writer restoring an old row whole: its ``version``
together with the ciphertext sealed for that version):

- ``tenantvault_sealed_rows``: every config and token row id ever inserted, when
  its row was deleted (that id never comes back), and for each config the highest
  version ever kept in its history (a new history row must be above it). Owned by
  the schema owner; no role but the owner holds a privilege on it (but a backup
  login's SELECT, as 0010 keeps it); written only by the triggers below (SECURITY
  DEFINER). Existing configs and tokens are recorded;
  a config's history mark starts at its current version.
- On ``email_provider_configs`` and ``email_provider_tokens``: an INSERT whose id
  was ever deleted is refused (a deleted token grant or a config deleted with its
  tenant cannot be put back); a DELETE records the id; an UPDATE is refused when it
  changes the id, lowers the version, or changes a sealed value without raising the
  version (unless to NULL) — except, for that last rule, as the migrator role,
  whose DEK rotation re-seals values in place.
- On ``email_provider_config_versions``: an INSERT must be above the config's
  history mark (a row purged or pruned never comes back at its version); an UPDATE
  may not change the row's key, nor set a sealed value (pruning sets NULL) but as
  the migrator role.

Claims (``tenantvault_operator_claims``): an operator job claims a tenant (DEK
rotation, shred) or the KEK decision by inserting ``(job, tenant_id)`` in a
transaction it keeps open for the work and then rolls back: a second claimer's
insert waits on the first's uncommitted row. No row is ever committed, so the
table stays empty. Only the migrator role may insert (and select); the
application role holds no privilege on it and cannot lock it, unlike an advisory
lock, which any login may take. Keys are the exact tenant id text.

Downgrade: drops the triggers, their functions and both tables (the replay marks
are guards, not data: nothing else is lost).

Revision ID: 0015_replay_guards_and_claims
Revises: 0014_grants_record_targets
"""

from __future__ import annotations

from alembic import op

from tenantvault.migration_support import (
    as_migrator,
    options,
    qualified,
    revoke_foreign_function_privileges,
    revoke_foreign_privileges,
)

revision = "0015_replay_guards_and_claims"
down_revision = "0014_grants_record_targets"
branch_labels = None
depends_on = None

ROWS = "tenantvault_sealed_rows"
CLAIMS = "tenantvault_operator_claims"
CONFIGS = "email_provider_configs"
TOKENS = "email_provider_tokens"
VERSIONS = "email_provider_config_versions"

NEW_ROW = "tenantvault_guard_new_row"
DELETED_ROW = "tenantvault_guard_deleted_row"
NEW_VERSION = "tenantvault_guard_new_history_version"
REWRITE = "tenantvault_refuse_rewrite"

# A backup login's read, as 0010 keeps it: SELECT by a BYPASSRLS role.
BACKUP_READ = (
    "(a.privilege_type = 'SELECT' AND "
    "COALESCE((SELECT rolbypassrls FROM pg_roles WHERE oid = a.grantee), false))"
)
# (table, kind recorded in ROWS)
ROW_TABLES = ((CONFIGS, "config"), (TOKENS, "token"))
FUNCTIONS = (NEW_ROW, DELETED_ROW, NEW_VERSION, REWRITE)


def _changed_to_a_value(column: str) -> str:
    return f"(NEW.{column} IS DISTINCT FROM OLD.{column} AND NEW.{column} IS NOT NULL)"


def _rewrite_conditions() -> dict[str, str]:
    """Per table, the WHEN of its rewrite trigger: what no application-role UPDATE may
    do. The migrator role (the operator's DEK rotation) re-seals values in place."""
    not_operator = f"NOT pg_has_role(current_user, '{options().migrator_role}', 'USAGE')"
    tokens = " OR ".join(
        _changed_to_a_value(c) for c in ("encrypted_access_token", "encrypted_refresh_token")
    )
    credentials = _changed_to_a_value("encrypted_credentials")
    return {
        CONFIGS: f"NEW.id <> OLD.id OR NEW.version < OLD.version OR "
        f"(NEW.version = OLD.version AND {credentials} AND {not_operator})",
        TOKENS: f"NEW.id <> OLD.id OR NEW.version < OLD.version OR "
        f"(NEW.version = OLD.version AND ({tokens}) AND {not_operator})",
        VERSIONS: "NEW.config_id <> OLD.config_id OR NEW.version <> OLD.version OR "
        f"({credentials} AND {not_operator})",
    }


def _tables() -> None:
    opts = options()
    rows, claims = qualified(ROWS), qualified(CLAIMS)
    op.execute(
        f"""
        CREATE TABLE {rows} (
          kind text NOT NULL CONSTRAINT ck_{ROWS}_kind CHECK (kind IN ('config', 'token')),
          id text NOT NULL,
          tenant_id text NOT NULL,
          history_version integer NOT NULL DEFAULT 0,
          deleted_at timestamp,
          CONSTRAINT {ROWS}_pkey PRIMARY KEY (kind, id)
        )
        """
    )
    comments = {
        None: "tenantvault: every config and token row id ever inserted, whether its row "
        "was deleted, and the highest version each config kept in history: the marks the "
        "replay guards read. Written only by their triggers; no privilege for other roles.",
        "kind": "config (email_provider_configs) or token (email_provider_tokens).",
        "id": "The row id.",
        "tenant_id": "The row's tenant when it was recorded (no foreign key: the mark "
        "outlives the tenant).",
        "history_version": "configs: the highest version ever inserted into "
        "email_provider_config_versions; a new history row must be above it.",
        "deleted_at": "When the row was deleted (UTC); then its id is never inserted again.",
    }
    _comment(ROWS, comments)
    op.execute(
        f"""
        CREATE TABLE {claims} (
          job text NOT NULL CONSTRAINT ck_{CLAIMS}_job
            CHECK (job IN ('tenant_keys', 'kek_rotation')),
          tenant_id text NOT NULL,
          CONSTRAINT {CLAIMS}_pkey PRIMARY KEY (job, tenant_id)
        )
        """
    )
    _comment(
        CLAIMS,
        {
            None: "tenantvault: operator claims. A job inserts its row in a transaction it "
            "keeps open for the work and rolls back, so rows are never committed; a second "
            "claimer waits on the first's. Only the migrator role may insert.",
            "job": "tenant_keys (DEK rotation and shred of a tenant) or kek_rotation (the "
            "decision to rotate the KEK).",
            "tenant_id": "The exact tenant id claimed ('' for kek_rotation).",
        },
    )
    # Whatever the schema's default privileges give others, nobody but the owner holds a
    # privilege on the marks; on the claims, the migrator role its insert (and select).
    # As 0010, a BYPASSRLS role's SELECT stays: a backup login's (docs/backup.md).
    for table in (ROWS, CLAIMS):
        revoke_foreign_privileges(f"c.oid = '{qualified(table)}'::regclass", kept=BACKUP_READ)
    op.execute(f'GRANT SELECT, INSERT ON {claims} TO "{opts.migrator_role}"')


def _comment(table: str, comments: dict[str | None, str]) -> None:
    for column, text in comments.items():
        target = qualified(table) if column is None else f"{qualified(table)}.{column}"
        kind = "TABLE" if column is None else "COLUMN"
        quoted = text.replace("'", "''")
        op.execute(f"COMMENT ON {kind} {target} IS '{quoted}'")


def _functions() -> None:
    rows = qualified(ROWS)
    utc_now = "timezone('utc', now())"
    # The mark's row is locked before the id is checked: a delete of that id in flight
    # (which updates the mark first) is waited for, and then seen (or, in REPEATABLE
    # READ, ends this insert with a serialization failure).
    op.execute(
        f"""
        CREATE FUNCTION {qualified(NEW_ROW)}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog
        AS $$
        DECLARE
          gone timestamp;
        BEGIN
          INSERT INTO {rows} (kind, id, tenant_id) VALUES (TG_ARGV[0], NEW.id, NEW.tenant_id)
            ON CONFLICT (kind, id) DO NOTHING;
          SELECT r.deleted_at INTO gone FROM {rows} r
            WHERE r.kind = TG_ARGV[0] AND r.id = NEW.id FOR UPDATE;
          IF gone IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'integrity_constraint_violation',
              MESSAGE = 'tenantvault: ' || TG_TABLE_NAME || ' row ' || NEW.id
                || ' was deleted; its id is never used again',
              HINT = 'A new row gets a new id.';
          END IF;
          RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION {qualified(DELETED_ROW)}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog
        AS $$
        BEGIN
          INSERT INTO {rows} AS r (kind, id, tenant_id, deleted_at)
            VALUES (TG_ARGV[0], OLD.id, OLD.tenant_id, {utc_now})
            ON CONFLICT (kind, id) DO UPDATE
              SET deleted_at = COALESCE(r.deleted_at, EXCLUDED.deleted_at);
          RETURN OLD;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION {qualified(NEW_VERSION)}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog
        AS $$
        DECLARE
          mark integer;
        BEGIN
          -- The mark's row stays locked (also when not moved) until this transaction ends.
          INSERT INTO {rows} AS r (kind, id, tenant_id, history_version)
            VALUES ('config', NEW.config_id, NEW.tenant_id, NEW.version)
            ON CONFLICT (kind, id) DO UPDATE SET history_version = EXCLUDED.history_version
              WHERE r.history_version < EXCLUDED.history_version
            RETURNING r.history_version INTO mark;
          IF mark IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'integrity_constraint_violation',
              MESSAGE = 'tenantvault: ' || TG_TABLE_NAME || ': config ' || NEW.config_id
                || ' already kept a version ' || NEW.version || ' or later',
              HINT = 'History only grows: a new version is above every version kept before.';
          END IF;
          RETURN NEW;
        END
        $$
        """
    )
    # Called only when the trigger's WHEN found a refused change: it says which.
    op.execute(
        f"""
        CREATE FUNCTION {qualified(REWRITE)}() RETURNS trigger
        LANGUAGE plpgsql
        SET search_path = pg_catalog
        AS $$
        DECLARE
          old_row jsonb := to_jsonb(OLD);
          new_row jsonb := to_jsonb(NEW);
          what text;
        BEGIN
          IF (new_row->>'version')::int < (old_row->>'version')::int THEN
            what := 'its version may not go down';
          ELSIF new_row->>'version' <> old_row->>'version'
             OR new_row->>'id' <> old_row->>'id'
             OR new_row->>'config_id' <> old_row->>'config_id' THEN
            what := 'its key may not change';
          ELSE
            what := 'a sealed value may change only with a new version (or to NULL)';
          END IF;
          RAISE EXCEPTION USING ERRCODE = 'integrity_constraint_violation',
            MESSAGE = 'tenantvault: ' || TG_TABLE_NAME || ' update refused: ' || what,
            HINT = 'Old rows are never put back; write through tenantvault.';
        END
        $$
        """
    )
    for function in FUNCTIONS:
        op.execute(f"REVOKE ALL ON FUNCTION {qualified(function)}() FROM PUBLIC")
    revoke_foreign_function_privileges()


def _triggers() -> None:
    for table, kind in ROW_TABLES:
        op.execute(
            f"CREATE TRIGGER trg_{table}_new_row BEFORE INSERT ON {qualified(table)} "
            f"FOR EACH ROW EXECUTE FUNCTION {qualified(NEW_ROW)}('{kind}')"
        )
        op.execute(
            f"CREATE TRIGGER trg_{table}_deleted_row BEFORE DELETE ON {qualified(table)} "
            f"FOR EACH ROW EXECUTE FUNCTION {qualified(DELETED_ROW)}('{kind}')"
        )
    op.execute(
        f"CREATE TRIGGER trg_{VERSIONS}_new_version BEFORE INSERT ON {qualified(VERSIONS)} "
        f"FOR EACH ROW EXECUTE FUNCTION {qualified(NEW_VERSION)}()"
    )
    for table, when in _rewrite_conditions().items():
        op.execute(
            f"CREATE TRIGGER trg_{table}_no_rewrite BEFORE UPDATE ON {qualified(table)} "
            f"FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION {qualified(REWRITE)}()"
        )


def _record_existing_rows() -> None:
    """The rows there are, read as the migrator role (RLS admits every tenant); only for
    this statement may it write the marks."""
    opts = options()
    rows = qualified(ROWS)
    op.execute(f'GRANT INSERT ON {rows} TO "{opts.migrator_role}"')
    with as_migrator():
        _insert_marks(rows)
    op.execute(f'REVOKE INSERT ON {rows} FROM "{opts.migrator_role}"')


def _insert_marks(rows: str) -> None:
    # A config's history mark is its current version: every version a history row was
    # ever kept for (purged ones too) is at or below it.
    op.execute(
        f"INSERT INTO {rows} (kind, id, tenant_id, history_version) "
        "SELECT 'config', c.id, c.tenant_id, GREATEST(c.version, COALESCE("
        f"(SELECT max(v.version) FROM {qualified(VERSIONS)} v "
        "WHERE v.tenant_id = c.tenant_id AND v.config_id = c.id), 0)) "
        f"FROM {qualified(CONFIGS)} c"
    )
    op.execute(
        f"INSERT INTO {rows} (kind, id, tenant_id) "
        f"SELECT 'token', t.id, t.tenant_id FROM {qualified(TOKENS)} t"
    )


def upgrade() -> None:
    _tables()
    _functions()
    # The triggers first: their locks keep writers out until the marks are recorded.
    _triggers()
    _record_existing_rows()


def downgrade() -> None:
    for table in (CONFIGS, TOKENS, VERSIONS):
        op.execute(f"DROP TRIGGER trg_{table}_no_rewrite ON {qualified(table)}")
    op.execute(f"DROP TRIGGER trg_{VERSIONS}_new_version ON {qualified(VERSIONS)}")
    for table, _ in ROW_TABLES:
        op.execute(f"DROP TRIGGER trg_{table}_deleted_row ON {qualified(table)}")
        op.execute(f"DROP TRIGGER trg_{table}_new_row ON {qualified(table)}")
    for function in reversed(FUNCTIONS):
        op.execute(f"DROP FUNCTION {qualified(function)}()")
    op.execute(f"DROP TABLE {qualified(CLAIMS)}")
    op.execute(f"DROP TABLE {qualified(ROWS)}")
