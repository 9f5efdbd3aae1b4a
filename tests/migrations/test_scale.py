"""Adoption of a database with 200,000 sender identities while the application keeps
updating them: no update of a sender waits more than about a second, however long
the data migration takes; and 0003 alone at 2,000,000 senders while the application's
own login reads and writes its tables. Prints the durations and the longest waits."""

from __future__ import annotations

import random
import threading
import time

import psycopg
import sqlalchemy as sa

from tenantvault.ops import migrate
from tenantvault.settings import Settings
from tests.migrations.legacy_app import LegacyApplication, app_login_url, seed_senders
from tests.support import REVISIONS

SENDERS = 200_000
TENANTS = 2_000
LONGEST_ACCEPTABLE_WAIT_SECONDS = 1.0


class SenderUpdater(threading.Thread):
    """The application: updates random senders one at a time, each in its own
    transaction, and records how long each waited."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.waits: list[float] = []
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as connection:
                while not self.stop.is_set():
                    sender = f"s_{random.randint(1, SENDERS):07d}"
                    started = time.perf_counter()
                    connection.execute(
                        "UPDATE dripiq_app.email_sender_identities SET from_name = %s "
                        "WHERE id = %s",
                        (f"Sender {started:.0f}", sender),
                    )
                    self.waits.append(time.perf_counter() - started)
        except BaseException as exc:
            self.errors.append(exc)


def test_adopting_200k_senders_never_holds_an_application_update_for_long(
    settings: Settings, owner_engine: sa.Engine, database_url: str
) -> None:
    with owner_engine.connect() as connection:
        seed_senders(connection, senders=SENDERS, tenants=TENANTS)
    updater = SenderUpdater(database_url)
    updater.start()
    time.sleep(0.5)  # the application is busy before the migration starts
    started = time.perf_counter()
    migrate.upgrade(settings, adopt=True)
    adoption = time.perf_counter() - started
    time.sleep(0.5)
    updater.stop.set()
    updater.join(timeout=30)
    assert updater.errors == []
    waits = sorted(updater.waits)
    longest = waits[-1]
    p99 = waits[int(len(waits) * 0.99)]
    print(
        f"\nadoption of {SENDERS} senders: {adoption:.1f} s; {len(waits)} application updates "
        f"meanwhile, p99 wait {p99 * 1000:.1f} ms, longest {longest * 1000:.1f} ms"
    )
    with owner_engine.connect() as connection:
        linked = connection.exec_driver_sql(
            "SELECT count(*) FROM dripiq_app.email_sender_identities "
            "WHERE provider_config_id IS NOT NULL"
        ).scalar_one()
        assert migrate.current_revision(connection, "dripiq_app") == REVISIONS[-1]
    assert linked == SENDERS // 2
    assert len(waits) > 100  # the application really ran throughout
    assert longest < LONGEST_ACCEPTABLE_WAIT_SECONDS

    # Downgrade and upgrade again: also in batches; reruns link nothing twice.
    started = time.perf_counter()
    migrate.downgrade(settings, REVISIONS[2])
    down = time.perf_counter() - started
    started = time.perf_counter()
    migrate.upgrade(settings)
    up = time.perf_counter() - started
    with owner_engine.connect() as connection:
        dead = connection.exec_driver_sql(
            "SELECT n_dead_tup FROM pg_stat_user_tables "
            "WHERE schemaname = 'dripiq_app' AND relname = 'email_sender_identities'"
        ).scalar_one()
    print(
        f"downgrade to {REVISIONS[2]}: {down:.1f} s; upgrade again: {up:.1f} s; dead tuples {dead}"
    )


# --- 0003 at 2,000,000 senders: the application reads and writes throughout ---

MANY_SENDERS = 2_000_000
MANY_TENANTS = 20_000


def test_0003_at_2m_senders_keeps_every_application_statement_under_a_second(
    settings: Settings, owner_engine: sa.Engine
) -> None:
    """0003 validates its key and builds its index while the application's own login
    reads and writes senders and tenants: no statement of it waits a second."""
    started = time.perf_counter()
    with owner_engine.connect() as connection:
        seed_senders(connection, senders=MANY_SENDERS, tenants=MANY_TENANTS)
    seeded = time.perf_counter() - started
    app = LegacyApplication(
        app_login_url(settings, owner_engine), senders=MANY_SENDERS, tenants=MANY_TENANTS
    )
    app.start()
    time.sleep(0.5)  # the application is busy before the migration starts
    at_0002 = time.perf_counter()
    migrate.upgrade(settings, REVISIONS[1], adopt=True)
    at_0003 = time.perf_counter()
    migrate.upgrade(settings, REVISIONS[2])
    done = time.perf_counter()
    time.sleep(0.5)
    app.stop.set()
    app.join(timeout=30)
    assert app.errors == []
    during_0002 = app.longest(at_0002, at_0003)
    during_0003 = app.longest(at_0003, done)
    ran = {t.name for t in app.timed if at_0003 <= t.started < done}
    print(
        f"\n{MANY_SENDERS} senders seeded in {seeded:.1f} s; 0002 took {at_0003 - at_0002:.1f} s, "
        f"0003 {done - at_0003:.1f} s; {len(app.timed)} application statements; longest "
        f"during 0002: {during_0002.name} {during_0002.seconds * 1000:.0f} ms, during 0003: "
        f"{during_0003.name} {during_0003.seconds * 1000:.0f} ms; test "
        f"{time.perf_counter() - started:.1f} s"
    )
    with owner_engine.connect() as connection:
        assert migrate.current_revision(connection, "dripiq_app") == REVISIONS[2]
        # The key is validated and the index usable: the scans did run, and finished.
        assert connection.exec_driver_sql(
            "SELECT (SELECT convalidated FROM pg_constraint "
            "WHERE conname = 'fk_email_sender_identities_provider_config'), "
            "(SELECT indisvalid FROM pg_index WHERE indexrelid = "
            "'dripiq_app.ix_email_sender_identities_tenant_id_provider_config_id'::regclass)"
        ).one() == (True, True)
    assert len(ran) == 7  # every kind of statement ran while 0003 did
    assert during_0002.seconds < LONGEST_ACCEPTABLE_WAIT_SECONDS
    assert during_0003.seconds < LONGEST_ACCEPTABLE_WAIT_SECONDS
