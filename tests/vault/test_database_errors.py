"""Every facade method raises only tenantvault's errors when the database fails it: a
refused port, a database never migrated, a statement cancelled by its timeout, an id
PostgreSQL cannot hold, a pool with no connection free. Each error chains the
driver's own as ``__cause__`` and names neither the statement nor a value. Both
facades, the hot path (``load_credentials``: one statement on a held connection) and
the full path (``list_active_configs``, ``get_config``: SQLAlchemy); real PostgreSQL."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from tenantvault import (
    DatabaseTimeout,
    DatabaseUnavailable,
    InvalidInputError,
    SchemaNotMigrated,
    TenantVaultError,
    Vault,
)
from tenantvault.db.session import create_engine
from tenantvault.settings import Settings, load_settings
from tests.conftest import CountingProvider, Services
from tests.vault.conftest import SMTP, VaultFactory

TENANT = "t_a"
CONFIG = "cfg7q2mfx9"  # an id no config has; like the tenant, it must not be echoed
# What the statements hold: none of it belongs in a message.
SQL = re.compile(r"(?i)\b(select|from|where|insert|update|returning)\b|%s|\$1|\(%")


def _assert_clean(
    error: BaseException, cause: type[BaseException] | tuple[type[BaseException], ...], *values: str
) -> None:
    assert isinstance(error, TenantVaultError)
    assert isinstance(error.__cause__, cause), repr(error.__cause__)
    message = str(error)
    assert not SQL.search(message), message
    for value in (TENANT, CONFIG, *values):
        assert value not in message, message


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _hot_then_full(built: Any) -> Iterator[tuple[str, BaseException]]:
    """The error of a hot-path load, then of a full-path call."""
    for name, call in (
        ("load_credentials", lambda: built.load_credentials(TENANT, CONFIG)),
        ("list_active_configs", lambda: built.list_active_configs(TENANT)),
    ):
        with pytest.raises(TenantVaultError) as caught:
            call()
        yield name, caught.value


def test_a_refused_port_is_database_unavailable_on_both_paths(
    make_vault: VaultFactory, services: Services, provider: CountingProvider
) -> None:
    port = _closed_port()
    settings = load_settings(
        database_url=f"postgresql://tenantvault_app@127.0.0.1:{port}/app",
        VAULT_ADDR=services.vault_addr,
        VAULT_TOKEN=services.vault_token,
    )
    with make_vault(settings, provider) as built:
        for name, error in _hot_then_full(built):
            assert isinstance(error, DatabaseUnavailable), name
            _assert_clean(error, psycopg.OperationalError)
            assert str(port) in str(error), name  # where it tried: libpq names host and port


def test_a_database_never_migrated_is_schema_not_migrated_naming_the_command(
    make_vault: VaultFactory, settings: Settings, provider: CountingProvider
) -> None:
    with make_vault(settings, provider) as built:  # a fresh, empty database
        for name, error in _hot_then_full(built):
            assert isinstance(error, SchemaNotMigrated), name
            assert "`tenantvault migrate`" in str(error), name
            # The hot path calls a function of the missing schema; the full path reads a table.
            _assert_clean(error, (psycopg.errors.InvalidSchemaName, psycopg.errors.UndefinedTable))


def test_a_statement_past_its_timeout_is_database_timeout_on_both_paths(
    make_vault: VaultFactory,
    app_settings: Settings,
    owner_engine: sa.Engine,
    provider: CountingProvider,
) -> None:
    # The server's timeout too, for a lane that does not send it (PgBouncer).
    with owner_engine.connect() as connection:
        database = connection.exec_driver_sql("SELECT current_database()").scalar_one()
        connection.exec_driver_sql(f'ALTER DATABASE "{database}" SET statement_timeout = 300')
        connection.commit()
    settings = app_settings.model_copy(update={"statement_timeout_ms": 300})
    with make_vault(settings, provider) as built:
        cfg = built.create_config(
            TENANT, type="smtp", name="Relay", config=SMTP, credentials={"password": "p4ss"}
        )
        built.load_credentials(TENANT, cfg.id)  # the key cached: the next load is the hot path
        with owner_engine.connect() as blocker:  # every read of the table waits for it
            blocker.exec_driver_sql(
                "LOCK TABLE dripiq_app.email_provider_configs IN ACCESS EXCLUSIVE MODE"
            )
            errors = []
            for call in (
                lambda: built.load_credentials(TENANT, cfg.id),
                lambda: built.list_active_configs(TENANT),
            ):
                with pytest.raises(DatabaseTimeout) as caught:
                    call()
                errors.append(caught.value)
            blocker.rollback()
        for error in errors:
            assert "statement timeout" in str(error)
            _assert_clean(error, psycopg.errors.QueryCanceled, cfg.id)
        assert built.load_credentials(TENANT, cfg.id).password is not None  # and it recovers


def test_a_nul_in_an_id_is_invalid_input_naming_the_field_where_known(
    make_vault: VaultFactory, app_settings: Settings, provider: CountingProvider
) -> None:
    bad = CONFIG + "\x00"
    with make_vault(app_settings, provider) as built:
        with pytest.raises(InvalidInputError, match=r"^config_id must not contain a NUL") as hot:
            built.load_credentials(TENANT, bad)
        assert hot.value.__cause__ is None  # refused before anything was sent
        with pytest.raises(InvalidInputError, match="NUL character") as full:
            built.get_config(TENANT, bad)
        _assert_clean(full.value, psycopg.DataError)


def test_a_pool_with_no_connection_free_is_database_unavailable(
    app_settings: Settings, provider: CountingProvider
) -> None:
    engine = create_engine(app_settings, pool_size=1, max_overflow=0, pool_timeout=0.2)
    made = Vault.from_settings(app_settings, key_provider=provider)
    built = Vault(engine, made.keyring)
    try:
        with engine.connect(), pytest.raises(DatabaseUnavailable, match="pool") as caught:
            built.list_active_configs(TENANT)  # the one connection is taken
        _assert_clean(caught.value, sa.exc.TimeoutError)
    finally:
        built.dispose()
        made.dispose()
