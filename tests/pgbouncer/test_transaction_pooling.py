"""Behind a real PgBouncer 1.18 in transaction pooling mode (the PgBouncer lane only):
what breaks there by default, and that tenantvault's settings and code hold.

The row-level-security, load, store and rotation suites run through the same
PgBouncer in this lane (tests/conftest.py); these are the pooler's own cases."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import errors

from tenantvault.db import startup
from tenantvault.db.operator import DEK_ROTATION_CLAIM, OperatorDatabase
from tenantvault.db.session import create_engine
from tenantvault.settings import Settings
from tests.conftest import Services


@pytest.fixture
def operator_processes(migrated: Settings) -> Iterator[list[OperatorDatabase]]:
    """Two operator processes' databases, each with its own connections to PgBouncer."""
    built = [OperatorDatabase.from_settings(migrated) for _ in range(2)]
    yield built
    for db in built:
        db.dispose()


def test_the_lane_reaches_postgresql_through_pgbouncer(
    migrated: Settings, app_settings: Settings, services: Services
) -> None:
    assert services.pgbouncer_port is not None
    for settings in (migrated, app_settings):
        assert settings.sqlalchemy_url.port == services.pgbouncer_port
        assert not settings.send_statement_timeout
        assert not settings.server_prepared_statements


def test_pgbouncer_refuses_the_statement_timeout_as_a_startup_option(
    app_settings: Settings,
) -> None:
    engine = create_engine(app_settings.model_copy(update={"send_statement_timeout": True}))
    try:
        with pytest.raises(sa.exc.OperationalError, match="unsupported startup parameter: options"):
            engine.connect()
    finally:
        engine.dispose()


def test_the_databases_statement_timeout_cancels_a_statement_through_pgbouncer(
    app_url: str, owner_engine: sa.Engine, app_settings: Settings
) -> None:
    # Before the app login's first connection: PgBouncer's server connections read the
    # database's setting when they log in.
    with owner_engine.connect() as connection:
        database = connection.exec_driver_sql("SELECT current_database()").scalar_one()
        connection.exec_driver_sql(f'ALTER DATABASE "{database}" SET statement_timeout = 150')
        connection.commit()
    engine = create_engine(app_settings.model_copy(update={"statement_timeout_ms": 150}))
    try:
        with engine.connect() as connection, pytest.raises(sa.exc.OperationalError) as caught:
            connection.execute(sa.text("SELECT pg_sleep(2)"))
        assert isinstance(caught.value.orig, errors.QueryCanceled)
    finally:
        engine.dispose()


def _alternate(url: str, settings: Settings) -> None:
    """Two clients run one statement in turns, ten times each, through PgBouncer (which
    gives each turn the server connection the last one left)."""
    args = startup.connect_args(settings)
    with (
        psycopg.connect(url, autocommit=True, **args) as one,
        psycopg.connect(url, autocommit=True, **args) as two,
    ):
        for _ in range(10):
            for client in (one, two):
                client.execute("SELECT %s::int", (1,))


def test_server_prepared_statements_collide_behind_pgbouncer_unless_turned_off(
    app_url: str, app_settings: Settings
) -> None:
    on = app_settings.model_copy(update={"server_prepared_statements": True})
    with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
        _alternate(app_url, on)
    _alternate(app_url, app_settings)  # off, as the lane's settings are: no error


def test_a_claim_excludes_another_process_when_they_share_a_server_connection(
    operator_processes: list[OperatorDatabase],
) -> None:
    one, other = operator_processes
    with one.claim(DEK_ROTATION_CLAIM, "t_a") as claimed:
        assert claimed
        # PgBouncer hands the other process the server connection the claim was taken on
        # (the one idle connection, the last used): a session's lock would be its too.
        with other.claim(DEK_ROTATION_CLAIM, "t_a") as also:
            assert not also
        with other.claim(DEK_ROTATION_CLAIM, "t_b") as different:
            assert different
    with other.claim(DEK_ROTATION_CLAIM, "t_a") as after:
        assert after  # released with the claim's transaction, wherever that ran
        with one.claim(DEK_ROTATION_CLAIM, "t_a") as during:
            assert not during


def _claims_held(owner_engine: sa.Engine) -> list[Any]:
    """The locks a claim's transaction holds on the claims table (none once it ended)."""
    with owner_engine.connect() as connection:
        return list(
            connection.exec_driver_sql(
                "SELECT pid FROM pg_locks WHERE granted AND relation = "
                "'dripiq_app.tenantvault_operator_claims'::regclass"
            ).all()
        )


def test_a_claim_ends_with_its_block_while_another_client_holds_its_server_connection(
    operator_processes: list[OperatorDatabase], owner_engine: sa.Engine
) -> None:
    one, other = operator_processes
    with ExitStack() as claim:
        assert claim.enter_context(one.claim(DEK_ROTATION_CLAIM, "t_a"))
        # The other process's transaction gets the server connection the claim was
        # taken on, if the claim let it go: a session's lock would then be released on
        # another server connection, or not at all, and leave the tenant claimed for good.
        with other.transaction() as busy:
            busy.exec_driver_sql("SELECT 1")
            claim.close()  # the claim's block ends here
            assert _claims_held(owner_engine) == []
    with other.claim(DEK_ROTATION_CLAIM, "t_a") as again:
        assert again
