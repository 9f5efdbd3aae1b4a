"""The database as operator jobs (key rotation, shredding) see it: every tenant at once.

Each transaction runs as the migrator role, whose row-level-security policy admits
every tenant's rows; the login must be allowed to ``SET ROLE`` to it (the
migration owner is). Work is shared between processes through PostgreSQL only:
a tenant is claimed with an advisory lock held by a transaction left open for the
work, released when the work is done or when the connection dies with its process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from tenantvault.db.session import check_tenant_id, create_engine
from tenantvault.errors import InvalidInputError, RotationError
from tenantvault.settings import Settings

DEK_ROTATION_CLAIM = 1_953_916_002
"""Advisory lock class of "an operator job is changing this tenant's data keys" (a DEK
rotation or a shred: they exclude each other)."""

KEK_ROTATION_LOCK = 1_953_916_003
"""Advisory lock class of "a rotate-keys process is deciding whether to rotate the KEK"."""


_CLAIM = sa.text(
    "SELECT pg_try_advisory_xact_lock(:cls, hashtext(:tenant_id)) "
    "FROM set_config('idle_in_transaction_session_timeout', '0', true)"
)


class OperatorDatabase:
    """Transactions as the migrator role, schema-qualified names, claims on tenants."""

    def __init__(self, engine: sa.Engine, *, schema: str, migrator_role: str) -> None:
        self.engine = engine
        self.schema = schema
        self.migrator_role = migrator_role

    def __repr__(self) -> str:
        return f"OperatorDatabase(engine={self.engine!r}, role={self.migrator_role})"

    @classmethod
    def from_settings(cls, settings: Settings, *, pool_size: int = 5) -> OperatorDatabase:
        engine = create_engine(settings, pool_size=pool_size, max_overflow=pool_size)
        return cls(engine, schema=settings.schema_name, migrator_role=settings.migrator_role)

    def table(self, name: str) -> str:
        """``name`` qualified with the schema, quoted (schema and table are identifiers)."""
        return f'"{self.schema}"."{name}"'

    @contextmanager
    def transaction(self, *, snapshot: bool = False) -> Iterator[sa.Connection]:
        """One transaction as the migrator role; commits when the block ends normally.

        ``snapshot``: REPEATABLE READ, so every statement sees the same committed state
        (a reader that compares two tables must not see one before and one after a
        writer's commit)."""
        with self.engine.connect() as connection:
            if snapshot:  # the pool puts the default back when the connection returns
                connection.execution_options(isolation_level="REPEATABLE READ")
            with connection.begin():
                try:
                    connection.exec_driver_sql(f'SET LOCAL ROLE "{self.migrator_role}"')
                except DBAPIError:
                    raise RotationError(
                        f"this login may not SET ROLE {self.migrator_role}: run operator "
                        "commands with the migration owner's TENANTVAULT_DATABASE_URL"
                    ) from None
                yield connection

    @contextmanager
    def claim(self, lock_class: int, tenant_id: str) -> Iterator[bool]:
        """Try to claim ``tenant_id`` for this process; yields whether it got it.

        The claim is a transaction's advisory lock, on a connection that stays in that
        transaction for the block. A session's lock would outlive its transaction on a
        server connection that a pooler in transaction mode (PgBouncer) then hands to
        other clients: they would hold the claim too (a session may take its own lock
        again), and the unlock could run on another server connection and free nothing.
        """
        with self.engine.connect() as connection, connection.begin():
            # One statement. The transaction sits idle while the work runs on other
            # connections (in READ COMMITTED it pins no snapshot, so VACUUM is not held
            # back): the server's idle-in-transaction timeout must not end it midway.
            got = connection.execute(
                _CLAIM, {"cls": lock_class, "tenant_id": tenant_id}
            ).scalar_one()
            yield bool(got)

    def require_tenants(self, tenants: Sequence[str] | None) -> None:
        """Refuse tenant ids with no row in the application's ``tenants`` table: a
        mistyped id must not read as "nothing to do".

        Raises:
            InvalidInputError: naming each unknown id (ids are not secret).
        """
        if not tenants:
            return
        wanted = [check_tenant_id(t) for t in tenants]
        with self.transaction() as connection:
            found = set(
                connection.execute(
                    sa.text(f"SELECT id FROM {self.table('tenants')} WHERE id = ANY(:ids)"),
                    {"ids": wanted},
                ).scalars()
            )
        missing = [t for t in dict.fromkeys(wanted) if t not in found]
        if missing:
            raise InvalidInputError(
                f"--tenant: no such tenant in {self.schema}.tenants: {', '.join(missing)}"
            )

    def dispose(self) -> None:
        self.engine.dispose()
