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
from dataclasses import dataclass

import sqlalchemy as sa

from tenantvault.db.migration_support import GRANTS_TABLE
from tenantvault.db.models import Base
from tenantvault.errors import InvalidInputError
from tenantvault.ops.migrate import LEGACY_TABLES, migration_engine
from tenantvault.settings import Settings

# A role name that needs no escaping inside double quotes.
_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")

# Tables of the schema that are tenantvault's, or Alembic's bookkeeping.
_NOT_THE_APPLICATIONS = {name for name in Base.metadata.tables if name not in LEGACY_TABLES} | {
    "alembic_version",
    GRANTS_TABLE,
}


@dataclass(frozen=True)
class AppLoginGrants:
    """The SQL for one login: ``owner_sql`` for the schema's owner, ``dba_sql`` for a
    role that may grant membership in the app role (a DBA)."""

    login: str
    dba_sql: list[str]
    owner_sql: list[str]


def app_login_grants(settings: Settings, login: str) -> AppLoginGrants:
    """The grants that let ``login`` run the application with tenant isolation intact.

    Raises:
        InvalidInputError: ``login`` is not an existing login role, or it could cross
            tenants (a superuser, BYPASSRLS, the schema's owner, or a member of the
            migrator role).
    """
    if not _ROLE_NAME.fullmatch(login):
        raise InvalidInputError("--app-login: must be a role name (letters, digits, _, $)")
    schema = settings.schema_name
    engine = migration_engine(settings)
    try:
        with engine.connect() as connection:
            _refuse_unsafe_login(connection, settings, login)
            relations = connection.execute(
                sa.text(
                    "SELECT c.relname, c.relkind = 'S' FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :schema "
                    "AND c.relkind IN ('r', 'p', 'S') AND NOT c.relispartition ORDER BY c.relname"
                ),
                {"schema": schema},
            ).all()
    finally:
        engine.dispose()
    own = [n for n, sequence in relations if not sequence and n not in _NOT_THE_APPLICATIONS]
    seqs = [name for name, sequence in relations if sequence]
    owner_sql = [f'GRANT USAGE ON SCHEMA "{schema}" TO "{login}";']
    if own:
        names = ", ".join(f'"{schema}"."{t}"' for t in own)
        owner_sql.append(f'GRANT SELECT, INSERT, UPDATE, DELETE ON {names} TO "{login}";')
    if seqs:
        names = ", ".join(f'"{schema}"."{s}"' for s in seqs)
        owner_sql.append(f'GRANT USAGE, SELECT, UPDATE ON SEQUENCE {names} TO "{login}";')
    return AppLoginGrants(login, [f'GRANT "{settings.app_role}" TO "{login}";'], owner_sql)


def _refuse_unsafe_login(connection: sa.Connection, settings: Settings, login: str) -> None:
    row = connection.execute(
        sa.text(
            "SELECT r.rolcanlogin, r.rolsuper OR r.rolbypassrls, "
            "  pg_has_role(r.oid, n.nspowner, 'MEMBER'), "
            "  pg_has_role(r.oid, to_regrole(:migrator), 'MEMBER') "
            "FROM pg_roles r, pg_namespace n WHERE r.rolname = :login AND n.nspname = :schema"
        ),
        {"login": login, "migrator": settings.migrator_role, "schema": settings.schema_name},
    ).one_or_none()
    if row is None:
        raise InvalidInputError(
            f"--app-login: no login role {login}, or no schema {settings.schema_name}"
        )
    can_login, bypasses, owns, migrates = row
    if not can_login:
        raise InvalidInputError(f"--app-login: {login} cannot log in")
    if bypasses:
        raise InvalidInputError(
            f"--app-login: {login} is a superuser or BYPASSRLS: row-level security "
            "would not bind it"
        )
    if owns:
        raise InvalidInputError(
            f"--app-login: {login} owns the schema (or is a member of its owner): it could "
            "alter or drop the tables"
        )
    if migrates:
        raise InvalidInputError(
            f"--app-login: {login} is a member of {settings.migrator_role}, whose policy "
            "admits every tenant's rows"
        )
