"""``tenantvault dev add-tenant``: a row in the dev stack's ``tenants`` table.

tenantvault never creates tenants: a tenant is the application's row, and a config for
an id without one is refused. On the dev stack there is no application to write it, so
this writes the row as the application would (``id``, ``name``; the timestamps are the
table's defaults), in the configured schema, as the stack's superuser. It is idempotent:
a tenant that exists is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from tenantvault.db.session import check_tenant_id
from tenantvault.errors import DevStackError, InvalidInputError

# A name is for people reading rows: printable, and short enough for one line.
MAX_NAME_LENGTH = 256


@dataclass(frozen=True)
class TenantRow:
    """The tenant's row after ``add_tenant``: ``added`` False if it was there already
    (``name`` is then the stored one)."""

    tenant_id: str
    name: str
    added: bool
    table: str


def check_id(tenant_id: str) -> str:
    """``tenant_id`` if it is a well-formed tenant id (as the vault requires it).

    Raises:
        InvalidInputError: names the argument, ``ID``, never the value.
    """
    try:
        return check_tenant_id(tenant_id)
    except InvalidInputError:
        raise InvalidInputError(
            "add-tenant ID must be 1-128 characters of [A-Za-z0-9_.:-] (a tenants.id)"
        ) from None


def check_name(name: str) -> str:
    """``name`` if it is 1 to MAX_NAME_LENGTH printable characters.

    Raises:
        InvalidInputError: names ``--name``, never the value.
    """
    if not 1 <= len(name) <= MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidInputError(f"--name must be 1-{MAX_NAME_LENGTH} printable characters")
    return name


def add_tenant(
    database_url: str, schema: str, tenant_id: str, name: str | None = None
) -> TenantRow:
    """Insert the tenant ``tenant_id`` (named ``name``, by default its id) into
    ``schema``.tenants of the database at ``database_url`` unless it is there.

    Raises:
        InvalidInputError: ``tenant_id`` is not a well-formed tenant id (the message
            names the argument, never the value), or ``name`` is empty or unprintable;
            nothing is written.
        DevStackError: the database has no ``tenants`` table in ``schema`` (not migrated).
    """
    check_id(tenant_id)
    name = check_name(tenant_id if name is None else name)
    table = sql.Identifier(schema, "tenants")
    with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as connection:
        found = connection.execute(
            "SELECT to_regclass(%s)", (table.as_string(connection),)
        ).fetchone()
        if found is None or found[0] is None:
            raise DevStackError(
                f"the dev stack's database has no {schema}.tenants table: run "
                "`tenantvault migrate` first (with the variables of `tenantvault dev env`)"
            )
        inserted = connection.execute(
            sql.SQL(
                "INSERT INTO {} (id, name) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING "
                "RETURNING name"
            ).format(table),
            (tenant_id, name),
        ).fetchone()
        if inserted is not None:
            return TenantRow(tenant_id, str(inserted[0]), True, f"{schema}.tenants")
        stored = connection.execute(
            sql.SQL("SELECT name FROM {} WHERE id = %s").format(table), (tenant_id,)
        ).fetchone()
    assert stored is not None  # there, since the insert conflicted on it
    return TenantRow(tenant_id, str(stored[0]), False, f"{schema}.tenants")
