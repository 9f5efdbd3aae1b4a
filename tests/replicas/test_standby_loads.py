"""Loads from a real hot standby: served there (counted by the standby itself), a
write of this process loads at once, a stopped or lagging standby costs no failed or
stale load, and row-level security holds on the standby as on the primary."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.orm import Session

from tenantvault import AsyncVault, Vault
from tenantvault.settings import Settings
from tests.conftest import CountingProvider
from tests.replicas.conftest import ReplicaPair

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}
LOAD = "tenantvault_load_credentials"
COUNT = "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname = %s"


def calls(url: str, function: str = LOAD) -> int:
    """How many times ``function`` ran on the server at ``url`` (its database), as far
    as its backends have reported (each reports when it exits)."""
    with psycopg.connect(url, autocommit=True) as connection:
        row = connection.execute(COUNT, (function,)).fetchone()
    assert row is not None
    return int(row[0])


def settled_calls(url: str, at_least: int, function: str = LOAD) -> int:
    """``calls`` once it reaches ``at_least`` (or after 10 s, whatever it is then)."""
    deadline = time.monotonic() + 10
    while (count := calls(url, function)) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def password(credentials: Any) -> str:
    return str(credentials.password.get_secret_value())


def replicated(vault: Vault, pair: ReplicaPair, value: str = "one", tenant: str = "t_a") -> str:
    """A new SMTP config of ``tenant`` whose password is ``value``, once the standby has
    it: its id."""
    cfg = vault.create_config(
        tenant, type="smtp", name="m", config=SMTP, credentials={"password": value}
    )
    pair.caught_up()
    return str(cfg.id)


@pytest.fixture
def replica_vault(standby_settings: Settings, provider: CountingProvider) -> Iterator[Vault]:
    built = Vault.from_settings(standby_settings, key_provider=provider)
    yield built
    built.dispose()


@pytest.fixture
def urls(settings: Settings, replica_pair: ReplicaPair) -> tuple[str, str]:
    """A superuser's URLs of the test database: on the primary, on the standby."""
    primary = settings.sqlalchemy_url.set(drivername="postgresql")
    rendered = primary.render_as_string(hide_password=False)
    return rendered, replica_pair.standby_url(rendered)


def test_loads_are_served_by_the_standby(
    replica_vault: Vault, replica_pair: ReplicaPair, urls: tuple[str, str]
) -> None:
    cfg_id = replicated(replica_vault, replica_pair)
    loads = 50
    for _ in range(loads):
        assert password(replica_vault.load_credentials("t_a", cfg_id)) == "one"
    replica_vault.dispose()  # the backends exit, and report their function calls
    primary_url, standby_url = urls
    assert settled_calls(standby_url, loads) == loads
    assert calls(primary_url) == 0


def test_a_write_of_this_process_loads_at_once_from_a_standby_that_has_not_replayed_it(
    replica_vault: Vault, replica_pair: ReplicaPair, urls: tuple[str, str]
) -> None:
    cfg_id = replicated(replica_vault, replica_pair)
    assert password(replica_vault.load_credentials("t_a", cfg_id)) == "one"  # key cached
    time.sleep(0.3)  # that load's full path committed too: the next probe covers it
    assert password(replica_vault.load_credentials("t_a", cfg_id)) == "one"
    with replica_pair.replay_paused():  # a caller's session: counted when it commits
        with Session(replica_vault.engine) as session, session.begin():
            replica_vault.store_credentials("t_a", cfg_id, {"password": "two"}, session=session)
        assert password(replica_vault.load_credentials("t_a", cfg_id)) == "two"
    time.sleep(0.3)  # the standby has it again, and the next probe finds so
    assert password(replica_vault.load_credentials("t_a", cfg_id)) == "two"
    with replica_pair.replay_paused():  # the vault's own transactions
        replica_vault.store_credentials("t_a", cfg_id, {"password": "three"})
        assert password(replica_vault.load_credentials("t_a", cfg_id)) == "three"
        other = replica_vault.create_config(
            "t_a", type="smtp", name="n", config=SMTP, credentials={"password": "new"}
        )
        assert password(replica_vault.load_credentials("t_a", other.id)) == "new"
        assert replica_vault.open_config("t_a", other.id).config.name == "n"
    time.sleep(0.3)  # the next probe finds the standby has it
    for _ in range(10):
        assert password(replica_vault.load_credentials("t_a", cfg_id)) == "three"
    replica_vault.dispose()
    _, standby_url = urls
    assert settled_calls(standby_url, 10) >= 10  # back on the standby once it replayed


def test_a_stopped_standby_costs_no_failed_load(
    replica_vault: Vault,
    standby_settings: Settings,
    provider: CountingProvider,
    replica_pair: ReplicaPair,
) -> None:
    cfg_id = replicated(replica_vault, replica_pair)
    assert password(replica_vault.load_credentials("t_a", cfg_id)) == "one"
    replica_pair.standby.stop()
    try:
        for _ in range(20):  # its held connections are gone: the primary serves
            assert password(replica_vault.load_credentials("t_a", cfg_id)) == "one"
        fresh = Vault.from_settings(standby_settings, key_provider=provider)
        try:  # a vault that starts while the standby is down
            assert password(fresh.load_credentials("t_a", cfg_id)) == "one"
        finally:
            fresh.dispose()
    finally:
        replica_pair.standby.start()
    replica_pair.caught_up()


def test_row_level_security_holds_on_the_standby_as_on_the_primary(
    replica_vault: Vault, replica_pair: ReplicaPair, standby_settings: Settings
) -> None:
    for tenant in ("t_a", "t_b"):
        replicated(replica_vault, replica_pair, tenant, tenant)
    app = standby_settings.sqlalchemy_url.set(drivername="postgresql")
    primary_app = app.render_as_string(hide_password=False)
    seen = {}
    for server, url in (
        ("primary", primary_app),
        ("standby", replica_pair.standby_url(primary_app)),
    ):
        with psycopg.connect(url) as connection:
            rows = "SELECT tenant_id FROM dripiq_app.email_provider_configs ORDER BY 1"
            untenanted = connection.execute(rows).fetchall()
            connection.execute("SELECT set_config('tenantvault.tenant_id', 't_a', true)")
            tenanted = connection.execute(rows).fetchall()
            in_recovery = connection.execute("SELECT pg_is_in_recovery()").fetchone()
        seen[server] = (untenanted, tenanted, in_recovery)
    assert seen["primary"] == ([], [("t_a",)], (False,))
    assert seen["standby"] == ([], [("t_a",)], (True,))


def test_a_standby_lagging_beyond_the_limit_is_skipped_for_the_primary(
    standby_settings: Settings, provider: CountingProvider, replica_pair: ReplicaPair
) -> None:
    lagging = standby_settings.model_copy(update={"read_max_lag_ms": 200})
    reader = Vault.from_settings(lagging, key_provider=provider)
    writer = Vault.from_settings(standby_settings, key_provider=provider)  # another process
    try:
        cfg_id = replicated(writer, replica_pair)
        assert password(reader.load_credentials("t_a", cfg_id)) == "one"
        with replica_pair.replay_paused():
            writer.store_credentials("t_a", cfg_id, {"password": "two"})
            time.sleep(0.5)  # beyond the limit: the standby is no longer current enough
            assert password(reader.load_credentials("t_a", cfg_id)) == "two"
    finally:
        reader.dispose()
        writer.dispose()


def test_async_loads_are_served_by_the_standby(
    replica_vault: Vault,
    standby_settings: Settings,
    provider: CountingProvider,
    replica_pair: ReplicaPair,
    urls: tuple[str, str],
) -> None:
    cfg_id = replicated(replica_vault, replica_pair)
    replica_vault.dispose()

    async def run() -> list[str]:
        vault = AsyncVault.from_settings(standby_settings, key_provider=provider)
        try:
            loaded = [await vault.load_credentials("t_a", cfg_id) for _ in range(20)]
            await vault.store_credentials("t_a", cfg_id, {"password": "two"})
            loaded.append(await vault.load_credentials("t_a", cfg_id))  # at once
            return [password(c) for c in loaded]
        finally:
            await vault.dispose()

    assert asyncio.run(run()) == ["one"] * 20 + ["two"]
    _, standby_url = urls
    assert settled_calls(standby_url, 19) >= 19  # the first may miss the key cache


SCANS = (
    "SELECT coalesce(sum(coalesce(seq_scan, 0) + coalesce(idx_scan, 0)), 0) "
    "FROM pg_stat_user_tables WHERE relname = 'tenant_data_keys'"
)


def key_reads(url: str) -> int:
    """Scans of the data-key table on the server at ``url``, as far as reported."""
    with psycopg.connect(url, autocommit=True) as connection:
        row = connection.execute(SCANS).fetchone()
    assert row is not None
    return int(row[0])


def test_warm_reads_the_standby_and_the_primary_when_it_is_down(
    standby_settings: Settings,
    provider: CountingProvider,
    replica_pair: ReplicaPair,
    urls: tuple[str, str],
) -> None:
    writer = Vault.from_settings(standby_settings, key_provider=provider)
    for tenant in ("t_a", "t_b"):
        replicated(writer, replica_pair, tenant=tenant)
    writer.dispose()
    _, standby_url = urls
    assert key_reads(standby_url) == 0
    warmer = Vault.from_settings(standby_settings, key_provider=provider)  # a cold cache
    report = warmer.warm(["t_a", "t_b"])
    warmer.dispose()
    assert (report.ok, report.warmed) == (True, 2)
    deadline = time.monotonic() + 10
    while key_reads(standby_url) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert key_reads(standby_url) > 0
    replica_pair.standby.stop()
    try:
        cold = Vault.from_settings(standby_settings, key_provider=provider)
        try:
            assert cold.warm(["t_a", "t_b"]).warmed == 2
        finally:
            cold.dispose()
    finally:
        replica_pair.standby.start()
    replica_pair.caught_up()
