"""Alembic environment: one transaction per revision, a lock timeout, an advisory lock.

Options (schema, roles, data-loss acknowledgement) come from
``config.attributes["tenantvault_options"]`` when a caller set them (the
``tenantvault migrate`` command, the tests), otherwise from ``TENANTVAULT_*``
settings and ``-x allow_data_loss=true``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sqlalchemy as sa
from alembic import context

from tenantvault.db.migration_support import ALLOW_DATA_LOSS_FLAG, OPTIONS_KEY, MigrationOptions
from tenantvault.db.models import Base
from tenantvault.settings import load_settings

# Any 64-bit constant, the same for every tenantvault process: it serializes
# concurrent `migrate` runs against one database.
MIGRATION_LOCK_KEY = 0x74656E616E747661

config = context.config


def _options() -> MigrationOptions:
    given = config.attributes.get(OPTIONS_KEY)
    if isinstance(given, MigrationOptions):
        return given
    flag = context.get_x_argument(as_dictionary=True).get(ALLOW_DATA_LOSS_FLAG, "false")
    return MigrationOptions.from_settings(
        load_settings(), allow_data_loss=flag.strip().lower() in {"1", "true", "yes"}
    )


def _create_schema_if_missing(schema: str) -> str:
    # Not CREATE SCHEMA IF NOT EXISTS: that checks CREATE on the database even when the
    # schema exists, and the owner of an existing schema need not have it.
    return (
        "DO $$ BEGIN\n"
        f"  IF NOT EXISTS (SELECT FROM pg_namespace WHERE nspname = '{schema}') THEN\n"
        f'    CREATE SCHEMA "{schema}";\n'
        "  END IF;\n"
        "END $$"
    )


def _include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    # Compare only the tables tenantvault models: the application's other
    # tables and columns in the same schema are none of our business.
    if type_ == "table":
        return name in Base.metadata.tables
    return True


def _configure(opts: MigrationOptions, **kwargs: Any) -> None:
    context.configure(
        target_metadata=Base.metadata,
        version_table_schema=opts.schema,
        transaction_per_migration=True,
        include_name=_include_name,
        compare_type=True,
        **{OPTIONS_KEY: opts},
        **kwargs,
    )


def run_migrations_offline() -> None:
    opts = _options()
    _configure(opts, dialect_name="postgresql", literal_binds=True)
    with context.begin_transaction():
        context.execute(f"SET lock_timeout = {opts.lock_timeout_ms}")
        context.execute(_create_schema_if_missing(opts.schema))
        context.run_migrations()


def _run_online(connection: sa.Connection, opts: MigrationOptions) -> None:
    """Run on a connection this module owns: advisory lock, lock timeout, commits."""
    # Revisions qualify every name. (Autogenerate compares the unqualified models
    # with the connection's default schema, so callers that autogenerate connect
    # with search_path set to the target schema: see tenantvault.migrate.)
    connection.exec_driver_sql(f"SET lock_timeout = {opts.lock_timeout_ms}")
    connection.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
    try:
        connection.exec_driver_sql(_create_schema_if_missing(opts.schema))
        connection.commit()
        _configure(opts, connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        connection.rollback()
        connection.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")
        connection.exec_driver_sql("RESET lock_timeout")
        connection.commit()


def _run_on_callers_connection(connection: sa.Connection, opts: MigrationOptions) -> None:
    """Run on a connection a caller manages (its transactions are the caller's, so data
    migrations do not commit between their batches)."""
    opts = dataclasses.replace(opts, commit_batches=False)
    connection.exec_driver_sql(_create_schema_if_missing(opts.schema))
    _configure(opts, connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    opts = _options()
    given = config.attributes.get("connection")
    if isinstance(given, sa.Connection):
        _run_on_callers_connection(given, opts)
        return
    if given is not None and not isinstance(given, sa.Engine):
        # An engine-like wrapper around a caller's open connection (pytest-alembic's).
        with given.connect() as connection:
            _run_on_callers_connection(connection, opts)
        return
    if given is not None:
        engine = given
    else:
        settings = load_settings()
        engine = sa.create_engine(
            settings.sqlalchemy_url,
            poolclass=sa.NullPool,
            connect_args={"options": f"-c search_path={opts.schema}"},
        )
    with engine.connect() as connection:
        _run_online(connection, opts)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
