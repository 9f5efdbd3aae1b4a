"""What a new connection is opened with (db/startup.py): the statement timeout sent, or
the server's checked; statements prepared on the server, or never."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from psycopg import errors

from tenantvault.db.session import async_held_connections, create_engine
from tenantvault.errors import ConfigurationError
from tenantvault.settings import Settings

SLEEP = sa.text("SELECT pg_sleep(2)")
PREPARED = "SELECT count(*) FROM pg_prepared_statements"


@pytest.fixture
def engines() -> Iterator[list[sa.Engine]]:
    """Engines a test builds, disposed afterwards."""
    built: list[sa.Engine] = []
    yield built
    for engine in built:
        engine.dispose()


def _engine(engines: list[sa.Engine], settings: Settings, **update: object) -> sa.Engine:
    engine = create_engine(settings.model_copy(update=update))
    engines.append(engine)
    return engine


def _set_database_timeout(owner_engine: sa.Engine, milliseconds: int) -> None:
    with owner_engine.connect() as connection:
        database = connection.exec_driver_sql("SELECT current_database()").scalar_one()
        connection.exec_driver_sql(
            f'ALTER DATABASE "{database}" SET statement_timeout = {milliseconds}'
        )
        connection.commit()


def test_a_sent_statement_timeout_cancels_a_longer_statement(
    settings: Settings, engines: list[sa.Engine]
) -> None:
    engine = _engine(engines, settings, send_statement_timeout=True, statement_timeout_ms=150)
    with engine.connect() as connection, pytest.raises(sa.exc.OperationalError) as caught:
        connection.execute(SLEEP)
    assert isinstance(caught.value.orig, errors.QueryCanceled)


def test_an_unsent_timeout_is_the_servers_and_a_different_one_fails_the_connect(
    settings: Settings, owner_engine: sa.Engine, engines: list[sa.Engine]
) -> None:
    _set_database_timeout(owner_engine, 150)
    engine = _engine(engines, settings, send_statement_timeout=False, statement_timeout_ms=150)
    with engine.connect() as connection, pytest.raises(sa.exc.OperationalError) as caught:
        connection.execute(SLEEP)
    assert isinstance(caught.value.orig, errors.QueryCanceled)

    mismatched = _engine(
        engines, settings, send_statement_timeout=False, statement_timeout_ms=30_000
    )
    with pytest.raises(ConfigurationError) as refused:
        mismatched.connect()
    message = str(refused.value)
    assert "TENANTVAULT_SEND_STATEMENT_TIMEOUT is false" in message
    assert "it is 150 ms, not the 30000 ms of TENANTVAULT_STATEMENT_TIMEOUT_MS" in message
    assert "ALTER ROLE ... SET statement_timeout = 30000" in message
    assert mismatched.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_server_without_a_timeout_fails_the_connect_when_none_is_sent(
    settings: Settings, owner_engine: sa.Engine, engines: list[sa.Engine]
) -> None:
    _set_database_timeout(owner_engine, 0)  # none: what a pooler's setup may leave
    engine = _engine(engines, settings, send_statement_timeout=False)
    with pytest.raises(ConfigurationError, match="it is 0 ms, not the 30000 ms"):
        engine.connect()


def _prepared_after_runs(engine: sa.Engine) -> int:
    """Server-side prepared statements on one connection after a statement ran ten times
    (psycopg prepares on the fifth) and once more asking to be prepared."""
    with engine.connect() as connection:
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        for _ in range(10):
            cursor.execute("SELECT %s::int", (1,))
        cursor.execute("SELECT %s::text", ("x",), prepare=True)
        cursor.execute(PREPARED)
        row = cursor.fetchone()
        connection.rollback()
    assert row is not None
    return int(row[0])


def test_statements_are_prepared_on_the_server_unless_turned_off(
    settings: Settings, engines: list[sa.Engine]
) -> None:
    assert _prepared_after_runs(_engine(engines, settings, server_prepared_statements=True)) == 2
    assert _prepared_after_runs(_engine(engines, settings, server_prepared_statements=False)) == 0


def test_asyncvaults_held_connections_check_the_servers_timeout_too(
    settings: Settings, owner_engine: sa.Engine
) -> None:
    """AsyncVault's hot path opens its connections straight with psycopg, not through
    an engine: they check the server's timeout as the engines' connections do."""
    _set_database_timeout(owner_engine, 150)

    async def first_row(**update: object) -> object:
        held = async_held_connections(
            settings.model_copy(update={"send_statement_timeout": False, **update})
        )
        try:
            return await held.fetch_one("SELECT current_setting('statement_timeout')", ())
        finally:
            await held.close()

    with pytest.raises(ConfigurationError, match="it is 150 ms, not the 30000 ms"):
        asyncio.run(first_row(statement_timeout_ms=30_000))
    assert asyncio.run(first_row(statement_timeout_ms=150)) == ("150ms",)
