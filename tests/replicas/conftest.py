"""A real streaming replica for the standby tests: a hot standby made with the embedded
PostgreSQL's ``pg_basebackup -R`` (tenantvault.dev.standby), started once per session
for the tests of this directory only.

Its primary is the session's embedded PostgreSQL. When TENANTVAULT_TEST_DATABASE_URL
names an external server (whose data directory a non-root test cannot copy), these
tests run against an embedded primary of their own instead, with its standby: they
run in that lane too, never skipped. ``services`` is overridden here so that every
fixture (databases, migrations, the app role, the vault) lands on that primary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tenantvault.db.standbys import PRIMARY_POSITION
from tenantvault.dev import stack as devstack
from tenantvault.dev.standby import Standby, make_standby, remove_standby
from tenantvault.settings import Settings, load_settings, parse_database_url
from tests.conftest import Services

REPLAYED = "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8 >= %s"


@dataclass(frozen=True)
class ReplicaPair:
    primary_url: str  # a superuser's
    standby: Standby
    started_in_seconds: float

    def standby_url(self, url: str) -> str:
        """``url`` (on the primary) moved to the standby."""
        moved = parse_database_url(url).set(drivername="postgresql", port=self.standby.port)
        return moved.render_as_string(hide_password=False)

    def caught_up(self, timeout: float = 15.0) -> None:
        """Wait until the standby has replayed everything the primary has now."""
        with psycopg.connect(self.primary_url, autocommit=True) as primary:
            # The vault's own reading of the primary's position (an idle primary's
            # insert position may sit just past a page header the standby reports before).
            position = primary.execute(PRIMARY_POSITION).fetchone()
        assert position is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.standby.url, autocommit=True) as standby:
                    done = standby.execute(REPLAYED, (position[0],)).fetchone()
                if done is not None and done[0]:
                    return
            except psycopg.OperationalError:
                pass  # starting up
            if time.monotonic() > deadline:
                raise AssertionError(f"the standby did not replay {position[0]} in {timeout}s")
            time.sleep(0.02)

    @contextlib.contextmanager
    def replay_paused(self) -> Iterator[None]:
        """The standby's replay paused (it keeps receiving WAL); resumed afterwards,
        and caught up."""
        with psycopg.connect(self.standby.url, autocommit=True) as standby:
            standby.execute("SELECT pg_wal_replay_pause()")
            # A request: replay stops at its next record, which the state then shows.
            deadline = time.monotonic() + 10
            state = "SELECT pg_get_wal_replay_pause_state()"
            while (standby.execute(state).fetchone() or ("",))[0] != "paused":
                assert time.monotonic() < deadline, "the standby's replay did not pause"
                time.sleep(0.01)
        try:
            yield
        finally:
            with psycopg.connect(self.standby.url, autocommit=True) as standby:
                standby.execute("SELECT pg_wal_replay_resume()")
        self.caught_up()


@dataclass(frozen=True)
class PairedServices(Services):
    replica: ReplicaPair | None = None


@pytest.fixture(scope="session")
def services(
    services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PairedServices]:
    """The session's services (OpenBao), with the pair's primary as the database server."""
    started = time.monotonic()
    own_dir: Path | None = None
    record = None
    if os.environ.get("TENANTVAULT_TEST_DATABASE_URL"):
        own_dir = tmp_path_factory.mktemp("replica-primary")
        record = devstack.start_postgres(own_dir, None)
        primary_url = f"postgresql://postgres@127.0.0.1:{record.port}/postgres"
    else:
        primary_url = services.admin_url
    primary_port = parse_database_url(primary_url).port or 5432
    standby: Standby | None = None
    try:
        standby = make_standby(tmp_path_factory.mktemp("replica"), primary_port)
        ReplicaPair(primary_url, standby, 0.0).caught_up()
        pair = ReplicaPair(primary_url, standby, time.monotonic() - started)
        yield PairedServices(primary_url, services.vault_addr, services.vault_token, replica=pair)
    finally:
        if standby is not None:
            remove_standby(standby)
        if own_dir is not None and record is not None:
            devstack.stop_postgres(own_dir, record)
            shutil.rmtree(devstack.postgres_home(own_dir), ignore_errors=True)


@pytest.fixture(scope="session")
def replica_pair(services: PairedServices) -> ReplicaPair:
    assert services.replica is not None
    return services.replica


@pytest.fixture
def standby_settings(app_settings: Settings, replica_pair: ReplicaPair) -> Settings:
    """The application's settings with the standby as its read replica; the test
    database counts function calls (on both servers: the setting replicates), and the
    standby has everything the primary has."""
    url = app_settings.database_url.get_secret_value()
    name = parse_database_url(url).database
    with psycopg.connect(replica_pair.primary_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE \"{name}\" SET track_functions = 'all'")
    replica_pair.caught_up()
    return load_settings(
        database_url=url,
        read_database_urls=replica_pair.standby_url(url),
        read_max_lag_ms=1000,
        VAULT_ADDR=app_settings.vault_addr and str(app_settings.vault_addr),
        VAULT_TOKEN=app_settings.vault_token and app_settings.vault_token.get_secret_value(),
    )
