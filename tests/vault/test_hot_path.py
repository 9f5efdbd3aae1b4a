"""Vault's load hot path: the connections it holds (a restart, 32 threads, no tenant
left behind, a size that is a setting) and the one round trip of a load joined to the
caller's transaction. Real PostgreSQL as the application role, real OpenBao."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import pq
from sqlalchemy.orm import Session

from tenantvault import NotFoundError, Vault
from tenantvault.db.held import HeldConnections
from tenantvault.settings import Settings
from tests.conftest import CountingProvider, Services
from tests.rotation_support import GRAPH, GRAPH_TOKEN
from tests.support import app_login_connections, terminate_app_backends
from tests.vault.conftest import password

TENANT_SETTING = "SELECT current_setting('tenantvault.tenant_id', true)"


def _held(vault: Vault) -> Any:
    held = vault._core.held  # the tests look inside on purpose
    assert isinstance(held, HeldConnections)
    return held


def _tenant_settings(vault: Vault) -> list[object]:
    """What each live held connection carries now, read on that very connection (one
    the server terminated and no load has used since carries nothing)."""
    values = []
    for cursor in _held(vault)._free:
        try:
            cursor.execute(TENANT_SETTING)
        except psycopg.OperationalError:
            assert cursor.connection.broken
            continue
        values.append(cursor.fetchone()[0])
    return values


def _app_backends(owner_engine: sa.Engine, services: Services) -> int:
    return app_login_connections(owner_engine, services.pgbouncer_port)


def test_a_restart_costs_no_load_and_no_tenant_setting_survives_a_load(
    seeded: dict[str, str], sync_vault: Vault, owner_engine: sa.Engine
) -> None:
    pairs = list(seeded.items())[:12]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda pair: sync_vault.load_credentials(*pair), pairs))  # warm, held
    assert _held(sync_vault)._free, "the hot path holds connections"
    assert terminate_app_backends(owner_engine) > 0
    with ThreadPoolExecutor(8) as pool:
        again = list(pool.map(lambda pair: password(sync_vault.load_credentials(*pair)), pairs))
    assert again == [tenant for tenant, _ in pairs]
    settings = _tenant_settings(sync_vault)
    assert settings
    assert all(value in (None, "") for value in settings), settings


def test_a_connection_broken_mid_statement_fails_that_call_only(
    app_settings: Settings, owner_engine: sa.Engine
) -> None:
    url = app_settings.sqlalchemy_url.set(drivername="postgresql")
    held = HeldConnections(
        lambda: psycopg.connect(url.render_as_string(hide_password=False)), size=1
    )
    try:
        started = threading.Event()

        def sleeper() -> BaseException | None:
            started.set()
            try:
                held.fetch_one("SELECT pg_sleep(30)", ())
            except psycopg.OperationalError as failed:
                return failed
            return None

        with ThreadPoolExecutor(1) as pool:
            outcome = pool.submit(sleeper)
            assert started.wait(10)
            deadline = time.monotonic() + 10
            while not _sleeping(owner_engine):
                assert time.monotonic() < deadline, "the statement never started"
            terminate_app_backends(owner_engine)
            assert isinstance(outcome.result(timeout=20), psycopg.OperationalError)
        assert held.fetch_one("SELECT 1", ()) == (1,)  # replaced, not handed out broken
    finally:
        held.close()


def _sleeping(owner_engine: sa.Engine) -> bool:
    with owner_engine.connect() as connection:
        return bool(
            connection.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' "
                    "AND state = 'active'"
                )
            ).scalar_one()
        )


@pytest.mark.parametrize("size", [2, 5])
def test_32_threads_each_get_their_own_tenant_within_the_size_setting(
    size: int,
    seeded: dict[str, str],
    app_settings: Settings,
    provider: CountingProvider,
    owner_engine: sa.Engine,
    services: Services,
) -> None:
    settings = app_settings.model_copy(update={"hot_path_connections": size})
    vault = Vault.from_settings(settings, key_provider=provider)
    pairs = list(seeded.items())
    try:
        for tenant, config_id in pairs:  # warm: from here on only the hot path runs
            vault.load_credentials(tenant, config_id)
        vault.engine.dispose()
        barrier = threading.Barrier(32)

        def worker(offset: int) -> list[tuple[str, str]]:
            barrier.wait()
            seen = []
            for n in range(300):
                tenant, config_id = pairs[(offset * 7 + n) % len(pairs)]
                seen.append((tenant, password(vault.load_credentials(tenant, config_id))))
            return seen

        with ThreadPoolExecutor(32) as pool:
            results = [item for part in pool.map(worker, range(32)) for item in part]
        assert len(results) == 32 * 300
        assert all(tenant == loaded for tenant, loaded in results)
        assert vault.engine.pool.checkedin() == 0  # type: ignore[attr-defined]
        assert len(_held(vault)._free) <= size
        assert _app_backends(owner_engine, services) <= size
        assert all(value in (None, "") for value in _tenant_settings(vault))
    finally:
        vault.dispose()
    assert _app_backends(owner_engine, services) == 0


def test_dispose_closes_the_held_connections(
    seeded: dict[str, str],
    app_settings: Settings,
    provider: CountingProvider,
    owner_engine: sa.Engine,
    services: Services,
) -> None:
    vault = Vault.from_settings(app_settings, key_provider=provider)
    tenant, config_id = next(iter(seeded.items()))
    vault.load_credentials(tenant, config_id)
    vault.load_credentials(tenant, config_id)
    assert _app_backends(owner_engine, services) >= 1
    vault.dispose()
    assert _app_backends(owner_engine, services) == 0


@contextmanager
def _round_trips(session: Session) -> Iterator[list[int]]:
    """Counts the round trips ``session``'s connection makes in the block (the server's
    ReadyForQuery messages in libpq's protocol trace)."""
    connection: Any = session.connection().connection.dbapi_connection
    counted: list[int] = []
    with tempfile.TemporaryFile("w+") as trace:
        connection.pgconn.trace(trace.fileno())
        connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield counted
        finally:
            connection.pgconn.untrace()
        trace.seek(0)
        counted.append(sum("\tReadyForQuery" in line for line in trace))


def test_a_load_joined_to_a_callers_transaction_is_one_round_trip(
    seeded: dict[str, str], sync_vault: Vault
) -> None:
    tenant, config_id = next(iter(seeded.items()))
    sync_vault.load_credentials(tenant, config_id)  # the key is cached
    with Session(sync_vault.engine) as session, session.begin():
        session.execute(sa.text("SELECT 1"))  # the caller's transaction is under way
        with _round_trips(session) as counted:
            loaded = sync_vault.load_credentials(tenant, config_id, session=session)
        assert password(loaded) == tenant
        assert counted == [1]
        # Like every call joined to a session, it leaves the transaction scoped to the tenant.
        assert session.execute(sa.text(TENANT_SETTING)).scalar_one() == tenant


def test_a_token_load_is_one_round_trip_and_leaves_no_tenant_on_a_held_connection(
    sync_vault: Vault,
) -> None:
    cfg = sync_vault.create_config(
        "t_a", type="microsoft_graph", name="G", config=GRAPH, credentials={"client_secret": "cs"}
    )
    sync_vault.store_oauth_token("t_a", cfg.id, **GRAPH_TOKEN)
    held = sync_vault.load_oauth_token("t_a", cfg.id)  # the key is cached now
    assert held.access_token is not None
    assert held.refresh_token is not None
    assert (held.access_token.get_secret_value(), held.refresh_token.get_secret_value()) == (
        "access-one",
        "refresh-one",
    )
    assert held.scopes == ("Mail.Send",)
    assert held.expires_at == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert held.expires_at.tzinfo is UTC
    assert all(value in (None, "") for value in _tenant_settings(sync_vault))
    with Session(sync_vault.engine) as session, session.begin():
        session.execute(sa.text("SELECT 1"))
        with _round_trips(session) as counted:
            joined = sync_vault.load_oauth_token("t_a", cfg.id, session=session)
        assert joined == held
        assert counted == [1]
    with pytest.raises(NotFoundError, match="has no OAuth token"):
        sync_vault.load_oauth_token("t_b", cfg.id)  # another tenant's row is not there
