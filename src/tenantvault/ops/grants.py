"""``tenantvault grants --app-login NAME``: the exact privileges the application's own
login needs, as SQL for the schema's owner to run.

The application stops logging in as the owner (the owner is bound by row-level
security only through FORCE, and may alter or drop the tables). Its new login gets:

- membership in the app role, for tenantvault's tables: their row-level security
  scopes it to the tenant each transaction sets, and the app role has no DELETE on
  configs, history or the audit log;
- on the application's own tables (every table in the schema that tenantvault did
  not create) and their sequences, what the application's ORM needs, granted to the
  login itself, so that no tenantvault downgrade can take it away.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sqlalchemy as sa

from tenantvault.db.migration_support import GRANTS_TABLE
from tenantvault.db.models import Base
from tenantvault.errors import InvalidInputError, MigrationError
from tenantvault.keys.legacy import RECORD_TABLE, SWITCH_TABLE
from tenantvault.ops.migrate import LEGACY_TABLES, migration_engine
from tenantvault.settings import Settings

# A role name that needs no escaping inside double quotes.
_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")

# Tables of the schema that are tenantvault's, or Alembic's bookkeeping.
_NOT_THE_APPLICATIONS = {name for name in Base.metadata.tables if name not in LEGACY_TABLES} | {
    "alembic_version",
    GRANTS_TABLE,
    RECORD_TABLE,
    SWITCH_TABLE,
}


@dataclass(frozen=True)
class AppLoginGrants:
    """The SQL for one login: ``owner_sql`` for the schema's owner, ``dba_sql`` for a
    role that may grant membership in the app role (a DBA).

    ``not_grantable`` names the application's tables and sequences the schema's owner
    may not grant on (it neither owns them nor holds the privileges WITH GRANT OPTION),
    each with its owner: ``owner_sql`` would fail on them, so :meth:`checked_owner_sql`
    refuses."""

    login: str
    schema: str
    schema_owner: str
    dba_sql: list[str]
    owner_sql: list[str]
    not_grantable: list[tuple[str, str]] = field(default_factory=list)

    def checked_owner_sql(self) -> list[str]:
        """``owner_sql``, or a refusal naming every relation the owner cannot grant on.

        Raises:
            MigrationError: the schema's owner does not own some of the application's
                tables or sequences (the migration guide's step 1 asks that it own
                every one): the message names each, with its owner, and the fix.
        """
        if not self.not_grantable:
            return self.owner_sql
        named = ", ".join(
            f"{self.schema}.{name} (owned by {owner})" for name, owner in self.not_grantable
        )
        raise MigrationError(
            f"the owner's part grants on every table and sequence of schema {self.schema}, "
            f"and its owner {self.schema_owner} may not grant on {named}: give them to it "
            f"(ALTER TABLE ... OWNER TO {self.schema_owner}, as a DBA, as the migration "
            "guide's step 1 says), then rerun"
        )


def app_login_grants(settings: Settings, login: str) -> AppLoginGrants:
    """The grants that let ``login`` run the application with tenant isolation intact.

    Raises:
        InvalidInputError: ``login`` is not an existing login role, or it could cross
            tenants: it is a superuser, has BYPASSRLS or CREATEROLE, or is a member,
            directly or through other roles, of a role that has one of those, of the
            owner of the schema or of tenantvault's tables, or of the migrator role.
    """
    if not _ROLE_NAME.fullmatch(login):
        raise InvalidInputError("--app-login: must be a role name (letters, digits, _, $)")
    schema = settings.schema_name
    engine = migration_engine(settings)
    try:
        with engine.connect() as connection:
            _refuse_unsafe_login(connection, settings, login)
            relations = connection.execute(sa.text(_RELATIONS), {"schema": schema}).all()
            schema_owner = connection.execute(
                sa.text("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = :s"),
                {"s": schema},
            ).scalar_one()
    finally:
        engine.dispose()
    ours = [r for r in relations if r.is_sequence or r.relname not in _NOT_THE_APPLICATIONS]
    own = [r.relname for r in ours if not r.is_sequence]
    seqs = [r.relname for r in ours if r.is_sequence]
    not_grantable = [(r.relname, r.owner) for r in ours if not r.grantable]
    owner_sql = [f'GRANT USAGE ON SCHEMA "{schema}" TO "{login}";']
    if own:
        names = ", ".join(f'"{schema}"."{t}"' for t in own)
        owner_sql.append(f'GRANT SELECT, INSERT, UPDATE, DELETE ON {names} TO "{login}";')
    if seqs:
        names = ", ".join(f'"{schema}"."{s}"' for s in seqs)
        owner_sql.append(f'GRANT USAGE, SELECT, UPDATE ON SEQUENCE {names} TO "{login}";')
    return AppLoginGrants(
        login,
        schema,
        schema_owner,
        [f'GRANT "{settings.app_role}" TO "{login}";'],
        owner_sql,
        not_grantable,
    )


# The schema's tables and sequences, each with its owner and whether the schema's
# owner may grant on it what the owner's part grants (owning it, or holding each
# privilege WITH GRANT OPTION): whoever runs the command, the owner runs that part.
_RELATIONS = """
SELECT c.relname, c.relkind = 'S' AS is_sequence, c.relowner::regrole::text AS owner,
       CASE WHEN c.relkind = 'S' THEN
         has_sequence_privilege(n.nspowner, c.oid, 'USAGE WITH GRANT OPTION')
         AND has_sequence_privilege(n.nspowner, c.oid, 'SELECT WITH GRANT OPTION')
         AND has_sequence_privilege(n.nspowner, c.oid, 'UPDATE WITH GRANT OPTION')
       ELSE
         has_table_privilege(n.nspowner, c.oid, 'SELECT WITH GRANT OPTION')
         AND has_table_privilege(n.nspowner, c.oid, 'INSERT WITH GRANT OPTION')
         AND has_table_privilege(n.nspowner, c.oid, 'UPDATE WITH GRANT OPTION')
         AND has_table_privilege(n.nspowner, c.oid, 'DELETE WITH GRANT OPTION')
       END AS grantable
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = :schema AND c.relkind IN ('r', 'p', 'S') AND NOT c.relispartition
ORDER BY c.relname
"""


# Every role ``login`` reaches through pg_auth_members, followed to any depth (each
# with the chain that reaches it), with what makes it unsafe. Depth 0 is the login
# itself. A member may SET ROLE to any role it reaches (on 16+ unless each grant says
# SET FALSE; refused all the same: the grant can be changed without us), so it can act
# with each one's attributes and ownerships.
_REACHED_ROLES = """
WITH RECURSIVE reached(oid, chain, depth) AS (
    SELECT r.oid, r.rolname::text, 0 FROM pg_roles r WHERE r.rolname = :login
  UNION
    SELECT m.roleid, reached.chain || ' > ' || g.rolname, reached.depth + 1
    FROM reached
    JOIN pg_auth_members m ON m.member = reached.oid
    JOIN pg_roles g ON g.oid = m.roleid
    -- PostgreSQL refuses circular memberships; the bound only keeps a bad catalog finite.
    WHERE reached.depth < 32
)
SELECT DISTINCT ON (reached.oid) r.rolname, reached.chain, reached.depth, r.rolsuper,
       r.rolbypassrls, r.rolcreaterole,
       r.oid = n.nspowner OR r.oid IN (
         SELECT c.relowner FROM pg_class c WHERE c.relnamespace = n.oid
           AND c.relname = ANY(:tenantvault_tables)),
       r.rolname = :migrator
FROM reached JOIN pg_roles r ON r.oid = reached.oid, pg_namespace n
WHERE n.nspname = :schema
ORDER BY reached.oid, reached.depth
"""


def _refuse_unsafe_login(connection: sa.Connection, settings: Settings, login: str) -> None:
    """Refuse a login that could cross tenants, naming the first reason found (the
    login's own attributes first, then the nearest role it is a member of)."""
    found = connection.execute(
        sa.text(
            "SELECT r.rolcanlogin, pg_has_role(r.oid, n.nspowner, 'MEMBER') "
            "FROM pg_roles r, pg_namespace n WHERE r.rolname = :login AND n.nspname = :schema"
        ),
        {"login": login, "schema": settings.schema_name},
    ).one_or_none()
    if found is None:
        raise InvalidInputError(
            f"--app-login: no login role {login}, or no schema {settings.schema_name}"
        )
    can_login, member_of_owner = found
    if not can_login:
        raise InvalidInputError(f"--app-login: {login} cannot log in")
    reached = connection.execute(
        sa.text(_REACHED_ROLES),
        {
            "login": login,
            "schema": settings.schema_name,
            "migrator": settings.migrator_role,
            "tenantvault_tables": sorted(_NOT_THE_APPLICATIONS - {"alembic_version"}),
        },
    ).all()
    for role, chain, depth, superuser, bypassrls, createrole, owner, migrator in sorted(
        reached, key=lambda row: (row.depth, row.rolname)
    ):
        reason = _unsafe(superuser, bypassrls, createrole, owner, migrator, settings)
        if reason is None:
            continue
        if depth == 0:
            raise InvalidInputError(f"--app-login: {login} {reason}")
        raise InvalidInputError(
            f"--app-login: {login} is a member of {role} ({chain}), which {reason}"
        )
    # A membership pg_auth_members does not list (pg_database_owner's, the database
    # owner's): pg_has_role still sees it.
    if member_of_owner:
        raise InvalidInputError(
            f"--app-login: {login} is a member of the schema's owner: it could alter or "
            "drop the tables"
        )


def _unsafe(
    superuser: bool,
    bypassrls: bool,
    createrole: bool,
    owner: bool,
    migrator: bool,
    settings: Settings,
) -> str | None:
    """Why a role (the login, or one it reaches) lets the login cross tenants."""
    if superuser:
        return "is a superuser: row-level security would not bind it"
    if bypassrls:
        return "has BYPASSRLS: row-level security would not bind it"
    if createrole:
        return (
            f"has CREATEROLE: it could grant itself {settings.migrator_role} "
            "(PostgreSQL 15) or make roles that cross tenants"
        )
    if owner:
        return "owns the schema or tenantvault's tables: it could alter or drop them"
    if migrator:
        return "is the migrator role, whose policy admits every tenant's rows"
    return None
