"""Fleet warm-up (issue 12, item 3) and no stampede on a failing Vault (item 4), on both
facades: real PostgreSQL as the application role, real OpenBao, requests counted as
they leave for it. Vault "goes down" by pointing the provider's client at a port
nobody listens on, and "comes back" by pointing it at the test OpenBao again."""

from __future__ import annotations

import math
import socket
import threading
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault.errors import DecryptionError, KeyProviderRefused, KeyProviderUnavailable
from tenantvault.keys.backoff import ProviderBackoff
from tenantvault.keys.warmup import WarmFailure
from tenantvault.settings import Settings
from tests.conftest import CountingProvider, Services
from tests.vault.conftest import VaultFactory, password
from tests.warm_support import counted_transit

BATCH = 32
KEYS = "dripiq_app.tenant_data_keys"


def _dead_address() -> str:
    """A loopback address where nothing listens (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _cached(vault: Any, tenant_id: str, version: int) -> bool:
    return vault.keyring.cache.get(tenant_id, version) is not None


def test_warm_makes_one_request_per_batch_and_later_loads_call_nothing(
    make_vault: VaultFactory, app_settings: Settings, services: Services, seeded: dict[str, str]
) -> None:
    transit, requests = counted_transit(services, batch_size=BATCH)
    provider = CountingProvider(transit)
    with make_vault(app_settings, provider) as vault:
        report = vault.warm(list(seeded))
        batches = math.ceil(len(seeded) / BATCH)
        assert (report.tenants, report.warmed, report.unwrap_requests) == (100, 100, batches)
        assert report.ok
        assert report.not_warmed == ()
        assert report.stopped is None
        assert requests.count("transit/decrypt/") == batches
        assert provider.calls == {"unwrap_many": batches}

        sent = len(requests.paths)
        for tenant, config_id in seeded.items():
            assert password(vault.load_credentials(tenant, config_id)) == tenant
        assert (provider.calls, len(requests.paths)) == ({"unwrap_many": batches}, sent)

        again = vault.warm([*seeded, *seeded])  # repeated ids count once
        assert (again.tenants, again.warmed, again.already_cached) == (100, 0, 100)
        assert again.unwrap_requests == 0
        assert len(requests.paths) == sent


def test_warm_takes_active_and_draining_keys_and_leaves_retired_and_destroyed_ones(
    make_vault: VaultFactory,
    app_settings: Settings,
    services: Services,
    seeded: dict[str, str],
    owner_engine: sa.Engine,
) -> None:
    transit, _ = counted_transit(services, batch_size=BATCH)
    _, second = transit.generate_data_key("t000")
    _, third = transit.generate_data_key("t002")
    with owner_engine.begin() as connection:
        for tenant, old_state, new in (("t000", "draining", second), ("t002", "retired", third)):
            connection.execute(
                sa.text(f"UPDATE {KEYS} SET state = :state WHERE tenant_id = :t"),
                {"t": tenant, "state": old_state},
            )
            connection.execute(
                sa.text(
                    f"INSERT INTO {KEYS} (tenant_id, version, wrapped_key, kek_version, kek_ref) "
                    "VALUES (:t, 2, :wrapped, :kek, :ref)"
                ),
                {
                    "t": tenant,
                    "wrapped": new.ciphertext,
                    "kek": new.kek_version,
                    "ref": transit.ref,
                },
            )
        connection.execute(
            sa.text(
                f"UPDATE {KEYS} SET state = 'destroyed', wrapped_key = NULL WHERE tenant_id = 't001'"
            )
        )
    with make_vault(app_settings, CountingProvider(transit)) as vault:
        report = vault.warm(list(seeded))
        # 100 tenants: t000 has two usable keys, t001 none, t002 one (its v2).
        assert (report.warmed, report.ok) == (100, True)
        assert [_cached(vault, "t000", v) for v in (1, 2)] == [True, True]
        assert [_cached(vault, "t002", v) for v in (1, 2)] == [False, True]
        assert not _cached(vault, "t001", 1)


def test_one_tenants_bad_wrapped_key_fails_only_itself_and_trips_no_backoff(
    make_vault: VaultFactory,
    app_settings: Settings,
    services: Services,
    seeded: dict[str, str],
    owner_engine: sa.Engine,
) -> None:
    with owner_engine.begin() as connection:  # t005's row now holds t006's wrapped key
        connection.execute(
            sa.text(
                f"UPDATE {KEYS} SET wrapped_key = "
                f"(SELECT wrapped_key FROM {KEYS} WHERE tenant_id = 't006') WHERE tenant_id = 't005'"
            )
        )
    transit, requests = counted_transit(services, batch_size=BATCH)
    provider = CountingProvider(transit)
    with make_vault(app_settings, provider) as vault:
        report = vault.warm(list(seeded))
        assert report.failed == (WarmFailure("t005", 1, "cannot unwrap data key"),)
        assert (report.warmed, report.stopped, report.not_warmed) == (99, None, ())
        assert requests.count("transit/decrypt/") == math.ceil(100 / BATCH)  # nothing halved

        with pytest.raises(DecryptionError):
            vault.load_credentials("t005", seeded["t005"])
        # One ciphertext that does not open is Vault answering: the next miss still calls.
        vault.keyring.cache.evict_tenant("t007")
        assert password(vault.load_credentials("t007", seeded["t007"])) == "t007"
        assert provider.calls["unwrap"] == 2


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _miss(vault: Any, tenant: str, config_id: str) -> BaseException | None:
    try:
        vault.load_credentials(tenant, config_id)
    except KeyProviderUnavailable as exc:
        return exc
    return None


def _misses_in_threads(vault: Any, pairs: list[tuple[str, str]]) -> list[BaseException | None]:
    """Each pair loaded by its own thread, all released at once."""
    start = threading.Barrier(len(pairs))
    outcomes: list[BaseException | None] = [None] * len(pairs)

    def worker(index: int) -> None:
        start.wait()
        outcomes[index] = _miss(vault, *pairs[index])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(pairs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_during_an_outage_misses_back_off_one_probe_goes_through_and_loads_recover(
    make_vault: VaultFactory, app_settings: Settings, services: Services, seeded: dict[str, str]
) -> None:
    transit, requests = counted_transit(services, url=_dead_address(), timeout_seconds=0.3)
    provider = CountingProvider(transit)
    pairs = list(seeded.items())
    with make_vault(app_settings, provider) as vault:
        clock = _Clock()
        vault.keyring.backoff = ProviderBackoff(
            initial_seconds=2.0, max_seconds=8.0, clock=clock, jitter=lambda: 0.999
        )
        first = _miss(vault, *pairs[0])
        assert first is not None
        assert "transit at" in str(first)
        assert provider.calls == {"unwrap": 1}
        attempts = len(requests.paths)

        # Within the window: 16 concurrent misses, then 40 repeated ones, call nothing.
        concurrent = _misses_in_threads(vault, pairs[1:17])
        repeated = [_miss(vault, *pairs[17 + i % 20]) for i in range(40)]
        assert all(isinstance(e, KeyProviderUnavailable) for e in concurrent + repeated)
        assert (provider.calls, len(requests.paths)) == ({"unwrap": 1}, attempts)
        message = str(repeated[0])
        assert "failed 0.0s ago" in message
        assert "next try in 2.0s" in message
        assert "is unreachable" in message
        assert services.vault_token not in message

        warm = vault.warm([tenant for tenant, _ in pairs])  # the gate holds warm-up too
        assert (warm.unwrap_requests, warm.warmed, len(warm.not_warmed)) == (0, 0, 100)
        assert warm.stopped is not None
        assert "next try in" in warm.stopped

        # The window passed, Vault still down: one of 16 concurrent misses probes.
        clock.now += 2.0
        probing = _misses_in_threads(vault, pairs[20:36])
        assert all(isinstance(e, KeyProviderUnavailable) for e in probing)
        assert provider.calls == {"unwrap": 2}

        # Vault is back; the (doubled) window passes; the probe unwraps, the gate opens.
        transit._client.url = services.vault_addr
        assert _miss(vault, *pairs[40]) is not None  # still within the 4 s window
        clock.now += 4.0
        for tenant, config_id in pairs[40:50]:
            assert password(vault.load_credentials(tenant, config_id)) == tenant
        assert provider.calls == {"unwrap": 12}
        report = vault.warm([tenant for tenant, _ in pairs])
        assert (report.ok, report.warmed, report.already_cached) == (True, 90, 10)


def test_a_refusing_vault_makes_misses_back_off_as_an_unreachable_one_does(
    make_vault: VaultFactory, app_settings: Settings, services: Services, seeded: dict[str, str]
) -> None:
    root, _ = counted_transit(services)
    client = root._client
    client.sys.create_or_update_policy(
        "tv-no-decrypt", 'path "transit/keys/tenantvault-tests" { capabilities = ["read"] }'
    )
    token = client.auth.token.create(policies=["tv-no-decrypt"], ttl="5m")["auth"]["client_token"]
    transit, requests = counted_transit(services, token=token)
    provider = CountingProvider(transit)
    pairs = list(seeded.items())
    with make_vault(app_settings, provider) as vault:
        vault.keyring.backoff = ProviderBackoff(clock=_Clock())  # time stands still
        with pytest.raises(KeyProviderRefused, match="may not unwrap"):
            vault.load_credentials(*pairs[0])
        sent = requests.count("transit/decrypt/")
        outcomes = [_miss(vault, *pair) for pair in pairs[1:30]]
        assert all(isinstance(e, KeyProviderUnavailable) for e in outcomes)
        assert "may not unwrap" in str(outcomes[0])
        assert token not in str(outcomes[0])
        assert (provider.calls, requests.count("transit/decrypt/")) == ({"unwrap": 1}, sent)


def test_warm_stops_when_the_cache_is_full_rather_than_push_its_own_keys_out(
    make_vault: VaultFactory, app_settings: Settings, services: Services, seeded: dict[str, str]
) -> None:
    transit, requests = counted_transit(services, batch_size=BATCH)
    small = app_settings.model_copy(update={"dek_cache_max_entries": 40})
    with make_vault(small, CountingProvider(transit)) as vault:
        report = vault.warm(list(seeded))
        assert (report.warmed, report.unwrap_requests, report.ok) == (40, 2, False)
        assert report.stopped == "the key cache holds at most 40 keys"
        assert report.not_warmed == tuple(list(seeded)[40:])
        assert requests.count("transit/decrypt/") == 2
        assert all(_cached(vault, tenant, 1) for tenant in list(seeded)[:40])
