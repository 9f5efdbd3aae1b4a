"""Which locks the revisions that touch the application's tables hold, read from
pg_locks while they hold them, and what the application can do meanwhile: what
docs/migration-guide.md's "Locks and durations" says."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command

from tenantvault.db.migration_support import MigrationOptions
from tenantvault.errors import MigrationError
from tenantvault.ops import migrate
from tenantvault.ops.migrate import alembic_config
from tenantvault.settings import Settings
from tests.migrations.legacy_app import LegacyApplication, app_login_url, seed_senders
from tests.support import REVISIONS, catalog_snapshot

SENDERS = 10_000
TENANTS = 100
INDEX = "dripiq_app.ix_email_sender_identities_tenant_id_provider_config_id"


@pytest.fixture
def app_url(settings: Settings, owner_engine: sa.Engine) -> str:
    """The deployed database, and its application's own login."""
    with owner_engine.connect() as connection:
        seed_senders(connection, senders=SENDERS, tenants=TENANTS)
    return app_login_url(settings, owner_engine)


def _held(owner_engine: sa.Engine, pid: int) -> set[tuple[str, str]]:
    """The locks ``pid`` holds on the application's tables."""
    with owner_engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT c.relname, l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "WHERE l.pid = :pid AND l.granted AND l.database = ("
                "  SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND c.relname IN ('tenants', 'users', 'email_sender_identities')"
            ),
            {"pid": pid},
        ).all()
    return {(name, mode) for name, mode in rows}


def _as_app(app_url: str, statement: str) -> None:
    """One statement as the application, giving up after 200 ms of waiting for a lock."""
    with psycopg.connect(app_url, autocommit=True) as connection:
        connection.execute("SET lock_timeout = 200")
        connection.execute(statement)


@pytest.mark.parametrize("revision", ["0002_provider_tables", "0005_tenant_data_keys"])
def test_a_revision_that_references_tenants_keeps_their_writes_waiting_until_it_commits(
    settings: Settings, owner_engine: sa.Engine, app_url: str, revision: str
) -> None:
    """Its new table's foreign key to tenants takes SHARE ROW EXCLUSIVE on them: the
    application reads tenants meanwhile, and its writes of tenants wait."""
    migrate.upgrade(settings, REVISIONS[REVISIONS.index(revision) - 1], adopt=True)
    with owner_engine.connect() as migrating:
        # On a caller's connection: the revision's transaction stays open until we end it.
        command.upgrade(
            alembic_config(MigrationOptions.from_settings(settings), connection=migrating),
            revision,
        )
        pid = migrating.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        # (ACCESS SHARE too, which only an ACCESS EXCLUSIVE request waits for.)
        assert _held(owner_engine, pid) == {
            ("tenants", "ShareRowExclusiveLock"),
            ("tenants", "AccessShareLock"),
        }
        _as_app(app_url, "SELECT name FROM dripiq_app.tenants WHERE id = 't_00001'")
        _as_app(app_url, "SELECT from_name FROM dripiq_app.email_sender_identities LIMIT 1")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            _as_app(app_url, "UPDATE dripiq_app.tenants SET name = 'N' WHERE id = 't_00001'")
        migrating.commit()
    _as_app(app_url, "UPDATE dripiq_app.tenants SET name = 'N' WHERE id = 't_00001'")


@contextmanager
def _old_snapshot(database_url: str) -> Iterator[None]:
    """A transaction that keeps the snapshot it took (a long report, say): a concurrent
    index build waits for it before it finishes. It locks none of the senders."""
    with psycopg.connect(database_url) as holder:
        holder.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        holder.execute("SELECT 1")
        yield
        holder.rollback()


def _waiting_index_build(owner_engine: sa.Engine) -> int:
    """The pid of 0003's index build, once it waits for the old snapshot."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with owner_engine.connect() as connection:
            pid = connection.exec_driver_sql(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND starts_with(query, 'CREATE INDEX CONCURRENTLY') AND wait_event = 'virtualxid'"
            ).scalar()
        if pid is not None:
            return int(pid)
        time.sleep(0.05)
    raise AssertionError("0003's index build never waited for the old snapshot")


def test_0003_reads_the_senders_without_holding_up_the_application(
    settings: Settings, owner_engine: sa.Engine, app_url: str, database_url: str
) -> None:
    """Past its catalog-only first part, 0003 holds only SHARE UPDATE EXCLUSIVE on the
    senders: while its index build waits, the application reads and writes them."""
    migrate.upgrade(settings, REVISIONS[1], adopt=True)
    patient = settings.model_copy(update={"migration_lock_timeout_ms": 60_000})
    failures: list[BaseException] = []

    def upgrade() -> None:
        try:
            migrate.upgrade(patient, REVISIONS[2])
        except BaseException as exc:
            failures.append(exc)

    with _old_snapshot(database_url):
        migrating = threading.Thread(target=upgrade)
        migrating.start()
        pid = _waiting_index_build(owner_engine)
        assert _held(owner_engine, pid) == {("email_sender_identities", "ShareUpdateExclusiveLock")}
        app = LegacyApplication(app_url, senders=SENDERS, tenants=TENANTS)
        app.start()
        time.sleep(1)
        app.stop.set()
        app.join(timeout=30)
        assert migrating.is_alive()  # still waiting: all of that ran during the build
    migrating.join(timeout=60)
    assert (app.errors, failures) == ([], [])
    assert len({t.name for t in app.timed}) == 7
    assert app.longest().seconds < 0.5
    with owner_engine.connect() as connection:
        assert migrate.current_revision(connection, "dripiq_app") == REVISIONS[2]


def _validity(owner_engine: sa.Engine) -> tuple[bool | None, bool | None]:
    """Whether 0003's key is validated and its index valid (None: not there)."""
    with owner_engine.connect() as connection:
        row = connection.exec_driver_sql(
            "SELECT (SELECT convalidated FROM pg_constraint "
            "WHERE conname = 'fk_email_sender_identities_provider_config'), "
            f"(SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('{INDEX}'))"
        ).one()
    return row[0], row[1]


def test_0003_stopped_in_its_index_build_is_finished_by_a_rerun(
    settings: Settings, owner_engine: sa.Engine, app_url: str, database_url: str
) -> None:
    """An index build that times out leaves the database at 0002 with 0003's first part
    and an invalid index; the rerun makes the same catalog as an uninterrupted run."""
    migrate.upgrade(settings, REVISIONS[1], adopt=True)
    with owner_engine.connect() as connection:
        at_0002 = catalog_snapshot(connection)
    quick = settings.model_copy(update={"migration_lock_timeout_ms": 300})
    with _old_snapshot(database_url), pytest.raises(MigrationError) as stopped:
        migrate.upgrade(quick, REVISIONS[2])
    assert "lock timeout" in str(stopped.value)
    assert str(stopped.value).endswith(f"the database is at {REVISIONS[1]}")
    assert _validity(owner_engine) == (True, False)

    migrate.upgrade(settings, REVISIONS[2])  # the rerun
    assert _validity(owner_engine) == (True, True)
    with owner_engine.connect() as connection:
        rerun = catalog_snapshot(connection)
    migrate.downgrade(settings, REVISIONS[1])
    with owner_engine.connect() as connection:
        assert catalog_snapshot(connection) == at_0002
    migrate.upgrade(settings, REVISIONS[2])
    with owner_engine.connect() as connection:
        assert catalog_snapshot(connection) == rerun
