"""The database as operator jobs (key rotation, shredding) see it: every tenant at once.

Each transaction runs as the migrator role, whose row-level-security policy admits
every tenant's rows; the login must be allowed to ``SET ROLE`` to it (the
migration owner is). Work is shared between processes through PostgreSQL only:
a tenant is claimed by a row of migration 0015's claims table, inserted by a
transaction left open for the work and rolled back when the work is done or when the
connection dies with its process. Only the migrator role may write that table, so
the application's login can neither take a claim nor hold one up; the key is the
exact tenant id (no hash, so no two tenants share a claim).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from tenantvault.db.session import check_tenant_id, create_engine
from tenantvault.errors import InvalidInputError, RotationError
from tenantvault.settings import Settings

DEK_ROTATION_CLAIM = "tenant_keys"
"""Claim of "an operator job is changing this tenant's data keys" (a DEK rotation or a
shred: they exclude each other)."""

KEK_ROTATION_CLAIM = "kek_rotation"
"""Claim of "a rotate-keys process is deciding whether to rotate the KEK" (no tenant)."""

CLAIMS_TABLE = "tenantvault_operator_claims"
"""Migration 0015's table of claims: the migrator role alone may write it, so the
application's login cannot take (or hold) a claim, as it could an advisory lock."""

BUSY_AFTER_MS = 50
"""How long a claim waits for another holder before it reports the tenant busy."""

_LOCK_NOT_AVAILABLE = "55P03"


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
                self._set_role(connection)
                yield connection

    def _set_role(self, connection: sa.Connection) -> None:
        try:
            connection.exec_driver_sql(f'SET LOCAL ROLE "{self.migrator_role}"')
        except DBAPIError:
            raise RotationError(
                f"this login may not SET ROLE {self.migrator_role}: run operator "
                "commands with the migration owner's TENANTVAULT_DATABASE_URL"
            ) from None

    @contextmanager
    def claim(self, job: str, tenant_id: str, *, wait: bool = False) -> Iterator[bool]:
        """Try to claim ``tenant_id`` for ``job`` (``''`` for a job of no tenant); yields
        whether this process got it. ``wait``: wait for another holder to finish (up to
        the statement timeout) instead of reporting it busy.

        The claim is an uncommitted row of the claims table, in a transaction that stays
        open for the block and is then rolled back: another claimer's insert of the same
        row waits for that transaction (``BUSY_AFTER_MS`` unless ``wait``), and no row is
        ever left behind. Transaction-scoped, it holds behind a pooler in transaction
        mode (PgBouncer), as a session's advisory lock would not: PgBouncer would hand
        the session, lock and all, to other clients.
        """
        with self.engine.connect() as connection:
            transaction = connection.begin()
            try:
                yield self._insert_claim(connection, job, tenant_id, wait=wait)
            finally:
                transaction.rollback()  # the claim ends; nothing of it was ever committed

    def _insert_claim(
        self, connection: sa.Connection, job: str, tenant_id: str, *, wait: bool
    ) -> bool:
        # The transaction sits idle while the work runs on other connections (in READ
        # COMMITTED it pins no snapshot, so VACUUM is not held back): the server's
        # idle-in-transaction timeout must not end it midway.
        timeout = "0" if wait else f"{BUSY_AFTER_MS}ms"
        connection.execute(
            sa.text(
                "SELECT set_config('idle_in_transaction_session_timeout', '0', true), "
                "set_config('lock_timeout', :timeout, true)"
            ),
            {"timeout": timeout},
        )
        self._set_role(connection)
        try:
            inserted = connection.execute(
                sa.text(
                    f"INSERT INTO {self.table(CLAIMS_TABLE)} (job, tenant_id) "
                    "VALUES (:job, :tenant_id) ON CONFLICT DO NOTHING RETURNING true"
                ),
                {"job": job, "tenant_id": tenant_id},
            ).first()
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
                return False  # another process holds it
            raise
        # A committed row (none is, but for an owner's by hand) claims it for good: busy.
        return inserted is not None

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
