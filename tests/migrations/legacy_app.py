"""The deployed application around a migration: its database filled with senders, its
own login (set up as the migration guide's step 5 does), and its statements on its
own tables run in a loop, each timed."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import sqlalchemy as sa

from tenantvault.ops.grants import app_login_grants
from tenantvault.settings import Settings
from tests.conftest import APP_LOGIN_ROLE

DEPLOYED_SCHEMA = (Path(__file__).parent / "fixtures" / "deployed_app_schema.sql").read_text()
SENDERS_TABLE = "dripiq_app.email_sender_identities"


def tenant_id(n: int) -> str:
    return f"t_{n:05d}"


def sender_id(n: int) -> str:
    return f"s_{n:07d}"


def seed_senders(connection: sa.Connection, *, senders: int, tenants: int) -> None:
    """The deployed schema with ``tenants`` tenants and ``senders`` senders, half of them
    SendGrid's, spread evenly over the tenants; vacuumed and analyzed, as a table that
    has lived for a while is.

    One INSERT ... SELECT, with the senders' unique constraint and foreign keys dropped
    while it runs and added again after (with the definitions the catalog had): their
    rows are checked once in bulk instead of row by row (at 2,000,000 senders 7 s
    instead of 42 s on a 2-core machine), and the schema is the same."""
    connection.exec_driver_sql(DEPLOYED_SCHEMA)
    connection.exec_driver_sql(
        "INSERT INTO dripiq_app.users (id, supabase_id, email) VALUES ('u_1', 'sb_1', 'u@x.test')"
    )
    connection.exec_driver_sql(
        "INSERT INTO dripiq_app.tenants (id, name) "
        f"SELECT 't_' || lpad(i::text, 5, '0'), 'T' || i FROM generate_series(1, {tenants}) i"
    )
    checks = connection.exec_driver_sql(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        f"WHERE conrelid = '{SENDERS_TABLE}'::regclass AND contype IN ('u', 'f')"
    ).all()
    connection.exec_driver_sql(
        f"ALTER TABLE {SENDERS_TABLE} " + ", ".join(f"DROP CONSTRAINT {name}" for name, _ in checks)
    )
    connection.exec_driver_sql(
        f"INSERT INTO {SENDERS_TABLE} "
        "(id, tenant_id, user_id, from_email, from_name, domain, sendgrid_sender_id) "
        "SELECT 's_' || lpad(i::text, 7, '0'), "
        f"'t_' || lpad((1 + mod(i, {tenants}))::text, 5, '0'), 'u_1', "
        "'sender' || i || '@x.test', 'Sender', 'x.test', "
        "CASE WHEN mod(i, 2) = 0 THEN 'sg-' || i END "
        f"FROM generate_series(1, {senders}) i"
    )
    connection.exec_driver_sql(
        f"ALTER TABLE {SENDERS_TABLE} "
        + ", ".join(f"ADD CONSTRAINT {name} {definition}" for name, definition in checks)
    )
    connection.commit()
    connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
        f"VACUUM (ANALYZE) {SENDERS_TABLE}"
    )


def app_login_url(settings: Settings, owner_engine: sa.Engine) -> str:
    """The application's own login, granted on its tables what ``tenantvault grants``
    gives it (the owner's part; the migration guide's step 5, before adoption)."""
    with owner_engine.begin() as connection:
        connection.exec_driver_sql(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_LOGIN_ROLE}')"
            f" THEN CREATE ROLE {APP_LOGIN_ROLE} LOGIN; END IF; END $$"
        )
    grants = app_login_grants(settings, APP_LOGIN_ROLE).checked_owner_sql()
    with owner_engine.begin() as connection:
        for statement in grants:
            connection.exec_driver_sql(statement)
    url = settings.sqlalchemy_url.set(drivername="postgresql", username=APP_LOGIN_ROLE)
    return url.set(password=None).render_as_string(hide_password=False)


@dataclass(frozen=True)
class Timed:
    """One application statement: what it was, when it started, how long it took."""

    name: str
    started: float
    seconds: float


class LegacyApplication(threading.Thread):
    """The application at work on its own tables, one statement at a time, each in its
    own transaction (autocommit, as its ORM runs single statements): it reads a sender,
    lists a tenant's senders, updates a sender, adds one and removes it, reads and
    updates a tenant. Columns are named, as an ORM names them."""

    def __init__(self, url: str, *, senders: int, tenants: int) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.senders = senders
        self.tenants = tenants
        self.stop = threading.Event()
        self.timed: list[Timed] = []
        self.errors: list[BaseException] = []

    def _statements(self) -> list[tuple[str, Callable[[int], tuple[str, tuple[object, ...]]]]]:
        def a_sender() -> str:
            return sender_id(random.randint(1, self.senders))

        def a_tenant() -> str:
            return tenant_id(random.randint(1, self.tenants))

        return [
            (
                "read a sender",
                lambda n: (
                    f"SELECT id, tenant_id, from_email, from_name, sendgrid_sender_id "
                    f"FROM {SENDERS_TABLE} WHERE id = %s",
                    (a_sender(),),
                ),
            ),
            (
                "list a tenant's senders",
                lambda n: (
                    f"SELECT id, from_email, from_name FROM {SENDERS_TABLE} "
                    "WHERE tenant_id = %s ORDER BY from_email",
                    (a_tenant(),),
                ),
            ),
            (
                "update a sender",
                lambda n: (
                    f"UPDATE {SENDERS_TABLE} SET from_name = %s, updated_at = now() WHERE id = %s",
                    (f"Sender {n}", a_sender()),
                ),
            ),
            (
                "add a sender",
                lambda n: (
                    f"INSERT INTO {SENDERS_TABLE} "
                    "(id, tenant_id, user_id, from_email, from_name, domain) "
                    "VALUES (%s, %s, 'u_1', %s, 'New', 'x.test')",
                    (f"n_{n}", a_tenant(), f"new{n}@x.test"),
                ),
            ),
            (
                "remove a sender",
                lambda n: (f"DELETE FROM {SENDERS_TABLE} WHERE id = %s", (f"n_{n}",)),
            ),
            (
                "read a tenant",
                lambda n: ("SELECT id, name FROM dripiq_app.tenants WHERE id = %s", (a_tenant(),)),
            ),
            (
                "update a tenant",
                lambda n: (
                    "UPDATE dripiq_app.tenants SET name = %s, updated_at = now() WHERE id = %s",
                    (f"T {n}", a_tenant()),
                ),
            ),
        ]

    def run(self) -> None:
        try:
            statements = self._statements()
            with psycopg.connect(self.url, autocommit=True) as connection:
                for n in itertools.count():
                    for name, statement in statements:
                        if self.stop.is_set():
                            return
                        sql, params = statement(n)
                        started = time.perf_counter()
                        connection.execute(sql, params)
                        self.timed.append(Timed(name, started, time.perf_counter() - started))
        except BaseException as exc:
            self.errors.append(exc)

    def longest(self, since: float = 0.0, until: float = float("inf")) -> Timed:
        """The statement that took longest among those that started in the window."""
        return max((t for t in self.timed if since <= t.started < until), key=lambda t: t.seconds)
