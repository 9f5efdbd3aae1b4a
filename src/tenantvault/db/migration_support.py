"""Helpers the Alembic revisions share: options, qualified names, and downgrade guards.

Revisions emit plain SQL through these, so every one also renders in offline
(``--sql``) mode, where nothing can be read back from the database.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from alembic import op

from tenantvault.db.session import TENANT_SETTING
from tenantvault.errors import MigrationError
from tenantvault.settings import Settings

OPTIONS_KEY = "tenantvault_options"
ALLOW_DATA_LOSS_FLAG = "allow_data_loss"


@dataclass(frozen=True)
class MigrationOptions:
    """What the revisions need to know about the target database."""

    schema: str = "dripiq_app"
    app_role: str = "tenantvault_app"
    migrator_role: str = "tenantvault_migrator"
    lock_timeout_ms: int = 5000
    allow_data_loss: bool = False
    # The target of a downgrade rendered by `tenantvault migrate --sql --downgrade`:
    # its guards' hints then name that command (with --from where the database
    # stopped), not Alembic's -x flag.
    rendered_downgrade_to: str | None = None
    # Data migrations commit between batches, outside the revision's transaction. False
    # when the migration runs on a caller's connection: its transactions are the caller's.
    commit_batches: bool = True
    # The deployment's KEK (Settings.default_kek_ref): what wrapped every data key that
    # migration 0018 finds, since until then one KEK wrapped them all.
    default_kek_ref: str = "transit:tenantvault"

    @classmethod
    def from_settings(
        cls, settings: Settings, *, allow_data_loss: bool = False
    ) -> MigrationOptions:
        return cls(
            schema=settings.schema_name,
            app_role=settings.app_role,
            migrator_role=settings.migrator_role,
            lock_timeout_ms=settings.migration_lock_timeout_ms,
            allow_data_loss=allow_data_loss,
            default_kek_ref=settings.default_kek_ref,
        )


def options() -> MigrationOptions:
    """The options of the running migration (set by ``migrations/env.py``)."""
    opts = op.get_context().opts[OPTIONS_KEY]
    assert isinstance(opts, MigrationOptions)
    return opts


def qualified(name: str) -> str:
    """``name`` qualified with the target schema, quoted."""
    return f'"{options().schema}"."{name}"'


def tenant_policy_predicate() -> str:
    """The row-level-security predicate: this row's tenant is the transaction's tenant.

    ``current_setting(..., true)`` is NULL before the setting was ever made on a
    connection, but ``''`` after a transaction that made it ended; NULLIF turns
    both into NULL, which matches no row (fail closed).
    """
    return f"tenant_id = NULLIF(current_setting('{TENANT_SETTING}', true), '')"


@contextmanager
def as_migrator() -> Iterator[None]:
    """Run the enclosed statements as the migrator role, which row-level security lets
    see and write every tenant's rows (the owner is bound by FORCE ROW LEVEL SECURITY)."""
    op.execute(f'SET LOCAL ROLE "{options().migrator_role}"')
    yield
    op.execute("RESET ROLE")


LEGACY_SENDGRID_NAME = "SendGrid (Default)"
LEGACY_SENDGRID_CONFIG = '{"legacy": true}'
"""The configs migration 0004 makes for tenants that used the application-wide
SendGrid key; SendGrid's config model knows the flag."""


def legacy_sendgrid_config(alias: str) -> str:
    """SQL true for a config migration 0004 made (``alias`` names the configs table)."""
    return (
        f"{alias}.type = 'sendgrid' AND {alias}.name = '{LEGACY_SENDGRID_NAME}' "
        f"AND {alias}.config @> '{LEGACY_SENDGRID_CONFIG}'::jsonb"
    )


@dataclass(frozen=True)
class Blocker:
    """Data a revision's downgrade would delete: ``rows`` is the ``FROM ... [WHERE ...]``
    that finds it, read as the migrator role (its policies admit every tenant)."""

    what: str
    rows: str


def schema_qualified(schema: str, name: str) -> str:
    """``name`` qualified with ``schema``: for code that runs outside a migration."""
    return f'"{schema}"."{name}"'


_STOPPED_AT = "tenantvault.downgrade_at"


def refuse_blocked(blockers: Sequence[Blocker]) -> None:
    """Stop the downgrade at the first blocker with rows (see :func:`refuse_if_rows`).

    ``tenantvault migrate --downgrade`` counts every blocker of every revision it would
    step through before it changes anything; these checks are the same guard for a
    downgrade run by plain Alembic, and for rows written while a downgrade runs."""
    if options().rendered_downgrade_to is not None:
        # The revision the database is at, for the hint: read as the owner, since the
        # guards run as the migrator role, which may not read alembic_version.
        op.execute(
            "DO $$ BEGIN\n"
            f"  PERFORM set_config('{_STOPPED_AT}', (SELECT version_num FROM "
            f"{qualified('alembic_version')}), true);\n"
            "END $$"
        )
    with as_migrator():
        for blocker in blockers:
            refuse_if_rows(f"SELECT 1 {blocker.rows}", blocker.what)


def refuse_if_rows(exists_query: str, what: str) -> None:
    """Stop the downgrade when ``exists_query`` finds a row, unless the operator
    acknowledged the loss (``-x allow_data_loss=true``, or ``--allow-data-loss``).

    The check runs in the database (a DO block), so it also guards SQL rendered
    offline with ``--sql``.
    """
    opts = options()
    if opts.allow_data_loss:
        return
    message = f"tenantvault: downgrade refused: it would delete {what}".replace("'", "''")
    hint = (
        "'Nothing was changed by this step. Back up the data, then rerun with "
        f"-x {ALLOW_DATA_LOSS_FLAG}=true to acknowledge the loss.'"
    )
    target = opts.rendered_downgrade_to
    if target is not None:
        # A script run with psql: the steps above this one are undone and committed,
        # and the database stays at this revision (read when the guard fires).
        at = f"current_setting('{_STOPPED_AT}', true)"
        hint = (
            "'Nothing was changed by this step; the steps above it were undone and the "
            f"database is at ' || {at} || '. Back up the data, then render the rest of the "
            f"downgrade again, acknowledging the loss: tenantvault migrate --sql --downgrade "
            f"--revision {target} --allow-data-loss --from ' || {at}"
        )
    op.execute(
        "DO $$ BEGIN\n"
        f"  IF EXISTS ({exists_query}) THEN\n"
        f"    RAISE EXCEPTION USING MESSAGE = '{message}', HINT = {hint};\n"
        "  END IF;\n"
        "END $$"
    )


def set_lz4_compression(table: str, columns: list[str]) -> None:
    """Use lz4 for these columns where the server was built with it (pglz otherwise)."""
    alters = ", ".join(f'ALTER COLUMN "{column}" SET COMPRESSION lz4' for column in columns)
    op.execute(
        "DO $$ BEGIN\n"
        "  IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression'\n"
        "             AND 'lz4' = ANY(enumvals)) THEN\n"
        f"    ALTER TABLE {qualified(table)} {alters};\n"
        "  END IF;\n"
        "END $$"
    )


def isolate_tenant_table(table: str) -> None:
    """Forced row-level security on ``tenant_id``, the migrator's policy, and the
    ``updated_at`` trigger: what every tenantvault table gets."""
    opts = options()
    name = qualified(table)
    op.execute(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY")
    predicate = tenant_policy_predicate()
    op.execute(
        f"CREATE POLICY tenant_isolation ON {name} USING ({predicate}) WITH CHECK ({predicate})"
    )
    op.execute(
        f'CREATE POLICY migrator_all_tenants ON {name} TO "{opts.migrator_role}" '
        "USING (true) WITH CHECK (true)"
    )
    op.execute(
        f"CREATE TRIGGER trg_{table}_touch_updated_at BEFORE UPDATE ON {name} "
        f"FOR EACH ROW EXECUTE FUNCTION {qualified('tenantvault_touch_updated_at')}()"
    )


# --- privileges on objects tenantvault did not create ---

GRANTS_TABLE = "tenantvault_grants"
"""Which privileges on the application's schema and tables the revisions granted, so
that a downgrade revokes exactly those and never one the database had before."""


_NAME = '"[a-z_][a-z0-9_]*"'
REVOKE_PATTERN = (
    rf"^REVOKE (USAGE|SELECT|INSERT|UPDATE|DELETE)( \({_NAME}\))? "
    rf"ON (SCHEMA {_NAME}|{_NAME}\.{_NAME}) FROM {_NAME}$"
)
"""The shape of the statements the grants record held before 0014 (its first CHECK):
any single-privilege REVOKE, on any schema or relation, from any role."""

GRANTS_CHECK = f"{GRANTS_TABLE}_revoke_check"


def recorded_revoke_pattern(schema: str, roles: Sequence[str]) -> str:
    """The only statements the grants record may hold (from 0014): a REVOKE of one
    privilege on ``schema`` itself or on one of its relations (or a column of one), from
    one of ``roles`` (tenantvault's app and migrator roles). A downgrade runs them as
    whoever runs it, so a row must not be able to name anything else: no other schema
    (``pg_catalog``), no other grantee (a superuser, the application's login).

    One regular expression read the same way by PostgreSQL and by Python's ``re`` (with
    ``fullmatch``): the names are plain lower-case identifiers (settings refuse others),
    so they need no escaping."""
    grantees = "|".join(f'"{role}"' for role in roles)
    return (
        rf'^REVOKE (USAGE ON SCHEMA "{schema}"|(SELECT|INSERT|UPDATE|DELETE)( \({_NAME}\))? '
        rf'ON "{schema}"\.{_NAME}) FROM ({grantees})$'
    )


def tenantvault_revoke_pattern(opts: MigrationOptions) -> str:
    """:func:`recorded_revoke_pattern` for the schema and roles of ``opts``."""
    return recorded_revoke_pattern(opts.schema, (opts.app_role, opts.migrator_role))


def unexpected_revoke(statement: str, revision: str, opts: MigrationOptions) -> str | None:
    """Why a statement recorded for ``revision`` must not run (None: it may), checked
    against :func:`recorded_revoke_pattern` in Python, whatever the record's CHECK says:
    the owner may drop a CHECK, and a row written before 0014 met only the looser one.

    The reason names the revision and the statement (the record holds SQL, no secret)."""
    if re.fullmatch(tenantvault_revoke_pattern(opts), statement):
        return None
    shown = statement if len(statement) <= 160 else statement[:160] + "..."
    return (
        f"{opts.schema}.{GRANTS_TABLE} holds, for {revision}, a statement tenantvault does "
        f"not write ({shown!r}); a downgrade runs only a REVOKE of one privilege on schema "
        f"{opts.schema} or its relations from {opts.app_role} or {opts.migrator_role}. Find "
        "out who wrote that row, delete it, and rerun"
    )


def create_grants_record() -> None:
    op.execute(
        f"CREATE TABLE {qualified(GRANTS_TABLE)} (\n"
        "  revision text NOT NULL,\n"
        f"  revoke text PRIMARY KEY CHECK (revoke ~ '{REVOKE_PATTERN}')\n"
        ")"
    )
    # Whatever the schema's default privileges would give others on it, nobody but the
    # owner may write (or read) the record.
    revoke_foreign_privileges(f"c.oid = '{qualified(GRANTS_TABLE)}'::regclass")
    op.execute(
        f"COMMENT ON TABLE {qualified(GRANTS_TABLE)} IS 'tenantvault: privileges its "
        "migrations granted on objects it did not create; each downgrade revokes its own.'"
    )


def revoke_foreign_privileges(relations: str, *, kept: str = "false") -> None:
    """Revoke every privilege that a role other than the owner holds on the relations
    ``relations`` selects (SQL on ``pg_class c``), except those ``kept`` keeps (SQL on
    the ACL item ``a``: ``a.grantee``, ``a.privilege_type``). PUBLIC included."""
    op.execute(
        "DO $$ DECLARE held record; BEGIN\n"
        "  FOR held IN SELECT c.oid::regclass AS relation, a.grantee, a.privilege_type\n"
        "    FROM pg_class c, aclexplode(c.relacl) a\n"
        f"    WHERE ({relations}) AND a.grantee <> c.relowner AND NOT ({kept})\n"
        "  LOOP\n"
        "    EXECUTE 'REVOKE ' || held.privilege_type || ' ON ' || held.relation || ' FROM '\n"
        "      || CASE WHEN held.grantee = 0 THEN 'PUBLIC' ELSE held.grantee::regrole::text END;\n"
        "  END LOOP;\n"
        "END $$"
    )


def revoke_foreign_function_privileges() -> None:
    """Revoke EXECUTE on tenantvault's functions (``tenantvault_*`` in the schema) from
    every role but the owner, the app and migrator roles, and PUBLIC (what PostgreSQL
    grants by default; the revisions revoke it where it matters): a schema's default
    privileges may have granted it to others. Run by each revision that adds one."""
    opts = options()
    ours = f"to_regrole('{opts.app_role}'), to_regrole('{opts.migrator_role}')"
    op.execute(
        "DO $$ DECLARE r record; BEGIN\n"
        "  FOR r IN SELECT DISTINCT p.oid::regprocedure AS function, a.grantee\n"
        "    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace,\n"
        "         aclexplode(p.proacl) a\n"
        f"    WHERE n.nspname = '{opts.schema}' AND p.proname LIKE 'tenantvault\\_%'\n"
        f"      AND a.grantee NOT IN (0, p.proowner, {ours})\n"
        "  LOOP\n"
        "    EXECUTE 'REVOKE ALL ON FUNCTION ' || r.function || ' FROM '\n"
        "      || r.grantee::regrole::text;\n"
        "  END LOOP;\n"
        "END $$"
    )


def drop_grants_record() -> None:
    # IF EXISTS: a database upgraded before the record existed has none.
    op.execute(f"DROP TABLE IF EXISTS {qualified(GRANTS_TABLE)}")


def _held(privilege: str, role: str, relation: str | None, column: str | None) -> str:
    """SQL true when ``role`` itself holds ``privilege`` (not through a membership)."""
    schema = options().schema
    if relation is None:
        acl, source = "n.nspacl", f"pg_namespace n WHERE n.nspname = '{schema}'"
    elif column is None:
        acl, source = "c.relacl", f"pg_class c WHERE c.oid = '{qualified(relation)}'::regclass"
    else:
        acl, source = (
            "a.attacl",
            f"pg_attribute a WHERE a.attrelid = '{qualified(relation)}'::regclass "
            f"AND a.attname = '{column}'",
        )
    return (
        f"EXISTS (SELECT FROM {source} AND EXISTS (SELECT FROM aclexplode({acl}) x "
        f"WHERE x.grantee = to_regrole('{role}') AND x.privilege_type = '{privilege}'))"
    )


def grant_kept_apart(
    revision: str,
    privilege: str,
    role: str,
    *,
    relation: str | None = None,
    column: str | None = None,
) -> None:
    """Grant ``privilege`` on the schema (or a relation, or one of its columns) to
    ``role`` unless the role holds it already, and record the grant for the downgrade.

    A privilege the database had before is left out of the record, so no downgrade
    takes away what the application had (its login's USAGE may come through the app
    role, as the migration guide's setup arranges)."""
    what = privilege if column is None else f'{privilege} ("{column}")'
    target = f'SCHEMA "{options().schema}"' if relation is None else qualified(relation)
    revoke = f'REVOKE {what} ON {target} FROM "{role}"'.replace("'", "''")
    op.execute(
        "DO $$ BEGIN\n"
        f"  IF NOT {_held(privilege, role, relation, column)} THEN\n"
        f'    GRANT {what} ON {target} TO "{role}";\n'
        f"    INSERT INTO {qualified(GRANTS_TABLE)} VALUES ('{revision}', '{revoke}');\n"
        "  END IF;\n"
        "END $$"
    )


def revoke_granted(revision: str) -> None:
    """Revoke what :func:`grant_kept_apart` granted for ``revision``, and nothing else.

    Online, the recorded statements are read, each checked in Python
    (:func:`unexpected_revoke`) before any runs, and run as read. Rendered offline
    (``--sql``), a DO block checks each against the same pattern in the database."""
    opts = options()
    table = qualified(GRANTS_TABLE)
    if not op.get_context().as_sql:
        connection = op.get_bind()
        # A database upgraded before the record existed has none: nothing is revoked.
        if connection.exec_driver_sql(f"SELECT to_regclass('{table}')").scalar() is None:
            return
        recorded = (
            connection.exec_driver_sql(
                f"DELETE FROM {table} WHERE revision = '{revision}' RETURNING revoke"
            )
            .scalars()
            .all()
        )
        for statement in recorded:  # all checked before the first runs
            reason = unexpected_revoke(statement, revision, opts)
            if reason is not None:
                raise MigrationError(
                    f"downgrade of {revision} refused, this step changed nothing: {reason}"
                )
        for statement in recorded:
            connection.exec_driver_sql(statement)
        return
    pattern = tenantvault_revoke_pattern(opts)
    op.execute(
        "DO $$ DECLARE granted record; BEGIN\n"
        f"  IF to_regclass('{table}') IS NULL THEN RETURN; END IF;\n"
        f"  FOR granted IN DELETE FROM {table} WHERE revision = '{revision}'"
        " RETURNING revoke LOOP\n"
        # Checked again here: the owner may have dropped the record's CHECK.
        f"    IF granted.revoke !~ '{pattern}' THEN\n"
        # (No % placeholder: percent signs do not survive offline rendering.)
        "      RAISE EXCEPTION USING MESSAGE = 'tenantvault: downgrade refused: the grants "
        "record holds a statement tenantvault does not write: ' || granted.revoke;\n"
        "    END IF;\n"
        "    EXECUTE granted.revoke;\n"
        "  END LOOP;\n"
        "END $$"
    )


SENDER_BATCH_ROWS = 5000
"""Rows per committed batch of a data migration over an application table: about
50 ms of row locks each at the measured rate (see docs/migration-guide.md)."""


def in_batches_as_migrator(table: str, update: str, *, rows: int = SENDER_BATCH_ROWS) -> None:
    """Run ``update`` over ``table`` (aliased ``esi``) in primary-key ranges of ``rows``,
    committing after each, as the migrator role.

    ``update`` holds ``{batch}`` where its WHERE clause restricts it to the range. The
    loop is a DO block outside the revision's transaction (Alembic's autocommit block),
    so it renders offline as well, and a rerun picks up what an interrupted run left.
    The revision's earlier statements are committed when the block starts.
    """
    name = qualified(table)
    statement = update.replace("{batch}", "esi.id > after AND esi.id <= upto")
    commit = options().commit_batches

    def loop() -> None:
        op.execute(
            "DO $$ DECLARE after text := ''; upto text; BEGIN\n"
            "  LOOP\n"
            f"    SELECT max(id) INTO upto FROM (SELECT id FROM {name} WHERE id > after "
            f"ORDER BY id LIMIT {rows}) AS batch;\n"
            "    EXIT WHEN upto IS NULL;\n"
            f"    {statement.strip()};\n"
            "    after := upto;\n" + ("    COMMIT;\n" if commit else "") + "  END LOOP;\n"
            "END $$"
        )

    if not commit:
        with as_migrator():
            loop()
        return
    with op.get_context().autocommit_block():
        # SET ROLE, not SET LOCAL: the loop commits, and the role must outlive each batch.
        op.execute(f'SET ROLE "{options().migrator_role}"')
        loop()
        op.execute("RESET ROLE")


def audit_partitions_function(schema: str, audit_table: str, *, private: bool = False) -> str:
    """``FUNCTION tenantvault_audit_add_partitions(months_ahead)`` (prefix CREATE or
    CREATE OR REPLACE): it makes the audit log's missing monthly partitions.

    ``private`` (from 0010): each new partition keeps no privilege the schema's default
    privileges would give it (but a BYPASSRLS role's SELECT: a backup login's); a
    partition has no row-level security of its own, and is reached only through its
    parent."""
    strip = (
        """              FOR held IN SELECT a.grantee, a.privilege_type
                FROM pg_class c, aclexplode(c.relacl) a
                WHERE c.oid = (quote_ident('{schema}') || '.' || quote_ident(part))::regclass
                  AND a.grantee <> c.relowner
                  AND NOT (a.privilege_type = 'SELECT' AND COALESCE(
                    (SELECT rolbypassrls FROM pg_roles WHERE oid = a.grantee), false))
              LOOP
                EXECUTE 'REVOKE ' || held.privilege_type || ' ON ' || quote_ident('{schema}')
                  || '.' || quote_ident(part) || ' FROM ' || CASE WHEN held.grantee = 0
                  THEN 'PUBLIC' ELSE held.grantee::regrole::text END;
              END LOOP;
""".replace("{schema}", schema)
        if private
        else ""
    )
    declare = "          held record;\n" if private else ""
    name = schema_qualified(schema, "tenantvault_audit_add_partitions")
    text = f"""FUNCTION {name}(months_ahead int)
        RETURNS int
        LANGUAGE plpgsql
        SET search_path = pg_catalog
        AS $$
        DECLARE
          month date;
          part text;
          made int := 0;
        BEGIN
          FOR month IN SELECT generate_series(
              date_trunc('month', timezone('utc', now())),
              date_trunc('month', timezone('utc', now())) + make_interval(months => months_ahead),
              interval '1 month')::date
          LOOP
            -- No format(): its percent signs do not survive offline (--sql) rendering.
            part := 'audit_events_' || to_char(month, 'YYYY_MM');
            IF to_regclass(quote_ident('{schema}') || '.' || quote_ident(part)) IS NULL THEN
              EXECUTE 'CREATE TABLE ' || quote_ident('{schema}') || '.' || quote_ident(part)
                || ' PARTITION OF ' || quote_ident('{schema}') || '.{audit_table}'
                || ' FOR VALUES FROM (' || quote_literal(month) || ') TO ('
                || quote_literal((month + interval '1 month')::date) || ')';
              EXECUTE 'CREATE TRIGGER ' || quote_ident('trg_' || part || '_no_truncate')
                || ' BEFORE TRUNCATE ON ' || quote_ident('{schema}') || '.'
                || quote_ident(part)
                || ' FOR EACH STATEMENT EXECUTE FUNCTION ' || quote_ident('{schema}')
                || '.tenantvault_audit_append_only()';
"""
    text = text.replace("          made int := 0;\n", "          made int := 0;\n" + declare)
    return (
        text
        + strip
        + """              made := made + 1;
            END IF;
          END LOOP;
          RETURN made;
        END
        $$
        """
    )


def replace_audit_action_check(actions: Sequence[str]) -> None:
    """The audit log's action CHECK, now listing ``actions`` (a revision that adds an
    audit action): added NOT VALID in the revision's transaction, then validated after
    it commits (SHARE UPDATE EXCLUSIVE, so the scan never holds up the log's writers),
    or in the caller's transaction when the migration runs in one."""
    audit = qualified("audit_events")
    op.execute(f"ALTER TABLE {audit} DROP CONSTRAINT ck_audit_events_action")
    listed = ", ".join(f"'{action}'" for action in actions)
    op.execute(
        f"ALTER TABLE {audit} ADD CONSTRAINT ck_audit_events_action "
        f"CHECK (action IN ({listed})) NOT VALID"
    )
    validate = f"ALTER TABLE {audit} VALIDATE CONSTRAINT ck_audit_events_action"
    if not options().commit_batches:  # on a caller's connection: its transaction
        op.execute(validate)
        return
    with op.get_context().autocommit_block():
        op.execute(validate)
