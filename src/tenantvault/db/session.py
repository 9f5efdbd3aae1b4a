"""Engines and the one door to tenant data: :func:`tenant_session`.

Row-level security on every tenantvault table admits only rows whose
``tenant_id`` equals the transaction-local setting ``tenantvault.tenant_id``.
The setting is made with ``set_config(..., true)`` inside the transaction, so it
ends with the transaction: a pooled connection (or PgBouncer in transaction
mode) never carries one tenant's setting into the next user's transaction.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sqlalchemy_async_engine
from sqlalchemy.orm import Session

from tenantvault.db import startup
from tenantvault.db.held import AsyncHeldConnections, HeldConnections
from tenantvault.errors import TenantNotSetError
from tenantvault.settings import Settings

TENANT_SETTING = "tenantvault.tenant_id"
"""The PostgreSQL setting the row-level-security policies compare ``tenant_id`` with."""

# Tenant ids come from the application (cuid2 today). Refusing anything outside a
# conservative alphabet keeps ids printable in errors and logs.
_TENANT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

_SET_TENANT = sa.text("SELECT set_config(:name, :tenant_id, true)")


def check_tenant_id(tenant_id: str) -> str:
    """Return ``tenant_id`` if it is a well-formed tenant id.

    Raises:
        TenantNotSetError: (an ``InvalidInputError``) it is empty, too long, or holds
            characters outside ``[A-Za-z0-9_.:-]``; the message names ``tenant_id``,
            never the value.
    """
    if not isinstance(tenant_id, str) or not _TENANT_ID.fullmatch(tenant_id):
        raise TenantNotSetError("tenant_id must be 1-128 characters of [A-Za-z0-9_.:-]")
    return tenant_id


def _engine_options(settings: Settings) -> dict[str, Any]:
    """What both engines are built with (one list, so they cannot drift)."""
    return {
        # No pre-ping: it would add a round trip to every load. A connection the
        # server dropped fails one call, and the pool replaces it.
        "pool_recycle": 1800,
        # Parameters are sealed values and wrapped keys: not secret, but no log needs them.
        "hide_parameters": True,
        "connect_args": startup.connect_args(settings),
    }


def create_engine(settings: Settings, *, url: sa.URL | None = None, **kwargs: object) -> Engine:
    """An engine whose statements are qualified with the configured schema, on the
    configured database (or ``url``: a standby's, with the same options)."""
    engine = sa.create_engine(url or settings.sqlalchemy_url, **_engine_options(settings), **kwargs)
    startup.check_server_timeout(engine, settings)
    return engine.execution_options(schema_translate_map={None: settings.schema_name})


def function_name(connection: Connection, name: str) -> str:
    """``name``, a function of the schema, qualified for ``connection`` (from an engine of
    :func:`create_engine`): the engine's schema_translate_map renames tables, not
    functions called in SQL text."""
    schema = connection.get_execution_options()["schema_translate_map"][None]
    return f'"{schema}".{name}'


def create_async_engine(settings: Settings, **kwargs: object) -> AsyncEngine:
    """:func:`create_engine`'s twin on psycopg's ``AsyncConnection`` (SQLAlchemy's
    asyncio layer picks psycopg's async driver for the same ``postgresql+psycopg`` URL)."""
    engine = sqlalchemy_async_engine(settings.sqlalchemy_url, **_engine_options(settings), **kwargs)
    startup.check_server_timeout(engine.sync_engine, settings)
    return engine.execution_options(schema_translate_map={None: settings.schema_name})


def held_connections(engine: Engine, *, size: int) -> HeldConnections:
    """Vault's hot-path connections, opened as ``engine`` opens its own (login, options,
    connect hooks) but never taken from its pool, which may hold stale ones."""
    # A pool of the engine's kind, creator and hooks that never keeps a connection:
    # each one it opens is detached at once and belongs to the held connections.
    opener = engine.pool.recreate()

    def connect() -> Any:
        pooled = opener.connect()
        pooled.detach()
        connection: Any = pooled.dbapi_connection
        connection.rollback()  # whatever connecting left open (nothing is sent when idle)
        return connection

    return HeldConnections(connect, size=size)


def async_held_connections(
    settings: Settings, *, url: sa.URL | None = None
) -> AsyncHeldConnections:
    """AsyncVault's hot-path connections: the engines' database (or ``url``: a
    standby's), login and options."""
    url = (url or settings.sqlalchemy_url).set(drivername="postgresql")
    return AsyncHeldConnections(
        url.render_as_string(hide_password=False),
        size=settings.hot_path_connections,
        check=startup.async_server_timeout_check(settings),
        **_engine_options(settings)["connect_args"],
    )


def fetch_one_in(session: Session, statement: str, params: tuple[Any, ...]) -> Any:
    """The first row of ``statement`` (DB-API, ``%s`` parameters), run on the driver
    connection of ``session``'s transaction: one round trip, none of the ORM's or
    Core's layers. Works on both drivers (inside SQLAlchemy's greenlet for asyncio)."""
    cursor = session.connection().connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(statement, params)
        return cursor.fetchone()
    finally:
        cursor.close()


def set_tenant(connection: Connection, tenant_id: str) -> None:
    """Scope the current transaction of ``connection`` to ``tenant_id``."""
    connection.execute(
        _SET_TENANT, {"name": TENANT_SETTING, "tenant_id": check_tenant_id(tenant_id)}
    )


@contextmanager
def tenant_session(engine: Engine, tenant_id: str) -> Iterator[Session]:
    """A session in one transaction that row-level security scopes to ``tenant_id``.

    Commits when the block ends normally, rolls back when it raises.

    Raises:
        TenantNotSetError: (an ``InvalidInputError``) ``tenant_id`` is malformed
            (nothing is opened).
    """
    check_tenant_id(tenant_id)
    with Session(engine) as session, session.begin():
        set_tenant(session.connection(), tenant_id)
        yield session
