"""tenantvault's metrics, read with the OpenTelemetry SDK's in-memory reader, against
real PostgreSQL and OpenBao: what a load, a store, a cache bound, a Vault outage and a
DEK rotation record, that no attribute carries a tenant id or a secret, and that a
global meter provider set after the instruments were made still gets them.

Most tests hand the vault a meter provider of their own (``meter_provider=``). DEK
rotation records on the global provider, which a process sets once: one module
fixture sets it, and those tests read what changed."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import hvac
import pytest
from opentelemetry import metrics as otel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from tenantvault import AsyncVault, KeyProviderUnavailable, Vault
from tenantvault.crypto.datakey import DataKey
from tenantvault.keys.cache import DataKeyCache
from tenantvault.kms.transit import TransitKeyProvider
from tenantvault.metrics import Metrics, default_metrics
from tenantvault.rotation.dek import rotate_data_keys
from tenantvault.rotation.kek import rotate_kek
from tenantvault.rotation.options import DekRotationOptions, KekRotationOptions
from tenantvault.settings import Settings
from tests.async_support import LoopThread
from tests.conftest import CountingProvider, Services, fresh_keyring, transit_provider
from tests.rotation_support import populate

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}
SECRET = "correct-horse-battery-staple"

Readings = dict[tuple[str, tuple[tuple[str, Any], ...]], float]

# Every attribute tenantvault records, and every value it may take (README, "Metrics").
ALLOWED = {
    "reason": {
        "max_age",
        "max_uses",
        "max_entries",
        "wrapping_changed",
        "retired",
        "tenant_evicted",
        "cleared",
    },
    "operation": {
        "generate",
        "unwrap",
        "unwrap_many",
        "rewrap",
        "rotate_kek",
        "kek_version",
        "min_decryption_version",
        "set_min_decryption_version",
        "mac",
        "verify_mac",
    },
    "outcome": {
        "ok",
        "error",
        "unavailable",
        "refused",
        # a DEK rotation's tenant outcomes
        "rotated",
        "resumed",
        "resealed",
        "no keys",
        "busy",
        "incomplete",
        "keys changed",
        "would rotate",
        "would resume",
        "would reseal",
    },
    "kind": {"dek", "kek"},
}


def readings(reader: InMemoryMetricReader) -> Readings:
    """Every tenantvault data point: (instrument, attributes) -> a sum's value or a
    histogram's count (cumulative)."""
    found: Readings = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            if scope.scope.name != "tenantvault":
                continue
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = point.count if isinstance(point, HistogramDataPoint) else point.value
                    found[(metric.name, tuple(sorted(point.attributes.items())))] = value
    return found


def changed(before: Readings, after: Readings) -> Readings:
    """What moved between two readings."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def key(name: str, **attributes: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    return (f"tenantvault.{name}", tuple(sorted(attributes.items())))


def assert_bounded(found: Readings, *forbidden: str) -> None:
    """Every attribute is a documented one with a documented value, and none holds
    (or contains) a tenant id or a secret."""
    assert found
    for _, attributes in found:
        for name, value in attributes:
            assert value in ALLOWED.get(name, set()), (name, value)
            assert not any(word in str(value) for word in forbidden), (name, value)


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(reader: InMemoryMetricReader) -> MeterProvider:
    return MeterProvider([reader])


@pytest.fixture
def metered_vault(
    app_settings: Settings, provider: CountingProvider, meter_provider: MeterProvider
) -> Iterator[Vault]:
    built = Vault.from_settings(app_settings, key_provider=provider, meter_provider=meter_provider)
    yield built
    built.dispose()


@pytest.fixture(scope="module")
def global_reader() -> InMemoryMetricReader:
    """The process's global meter provider, set once, after tenantvault's default
    instruments were made (as an application that configures OpenTelemetry after
    importing and using tenantvault)."""
    made_before = default_metrics()
    assert not isinstance(otel.get_meter_provider(), MeterProvider), "set by someone else"
    found = InMemoryMetricReader()
    otel.set_meter_provider(MeterProvider([found]))
    assert default_metrics() is made_before
    return found


def test_a_cold_load_counts_a_miss_and_a_vault_call_a_warm_one_a_hit(
    metered_vault: Vault, reader: InMemoryMetricReader, provider: CountingProvider
) -> None:
    config = metered_vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": SECRET}
    )
    metered_vault.keyring.cache.clear()
    before = readings(reader)
    unwraps = provider.calls.get("unwrap", 0)

    assert metered_vault.load_credentials("t_a", config.id).password.get_secret_value() == SECRET
    cold = readings(reader)
    assert provider.calls["unwrap"] == unwraps + 1
    assert changed(before, cold) == {
        key("key_cache.misses"): 1,
        key("key_provider.calls", operation="unwrap", outcome="ok"): 1,
        key("key_provider.duration", operation="unwrap", outcome="ok"): 1,
        key("credentials.load.duration"): 1,
    }

    metered_vault.load_credentials("t_a", config.id)
    assert changed(cold, readings(reader)) == {
        key("key_cache.hits"): 1,
        key("credentials.load.duration"): 1,
    }


def test_a_store_is_timed_and_every_attribute_is_bounded(
    metered_vault: Vault, reader: InMemoryMetricReader
) -> None:
    config = metered_vault.create_config(
        "t_b", type="smtp", name="Relay", config=SMTP, credentials={"password": "first"}
    )
    before = readings(reader)
    metered_vault.store_credentials("t_b", config.id, {"password": SECRET})
    moved = changed(before, readings(reader))
    assert moved[key("credentials.store.duration")] == 1

    metered_vault.load_credentials("t_b", config.id)
    assert_bounded(readings(reader), "t_b", config.id, SECRET, "first")


def test_two_vaults_on_one_meter_provider_both_count(
    app_settings: Settings,
    provider: CountingProvider,
    reader: InMemoryMetricReader,
    meter_provider: MeterProvider,
    metered_vault: Vault,
) -> None:
    config = metered_vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": SECRET}
    )
    metered_vault.load_credentials("t_a", config.id)
    second = Vault.from_settings(app_settings, key_provider=provider, meter_provider=meter_provider)
    try:
        second.load_credentials("t_a", config.id)  # its own cache: a miss
        before = readings(reader)
        metered_vault.load_credentials("t_a", config.id)
        second.load_credentials("t_a", config.id)
        moved = changed(before, readings(reader))
    finally:
        second.dispose()
    assert moved == {key("key_cache.hits"): 2, key("credentials.load.duration"): 2}


def test_an_eviction_for_room_is_counted(
    app_settings: Settings, provider: CountingProvider, reader: InMemoryMetricReader
) -> None:
    one_key = app_settings.model_copy(update={"dek_cache_max_entries": 1})
    vault = Vault.from_settings(
        one_key, key_provider=provider, meter_provider=MeterProvider([reader])
    )
    try:
        configs = {
            tenant: vault.create_config(
                tenant, type="smtp", name="Relay", config=SMTP, credentials={"password": SECRET}
            ).id
            for tenant in ("t_a", "t_b")
        }
        before = readings(reader)
        vault.load_credentials("t_a", configs["t_a"])
        vault.load_credentials("t_b", configs["t_b"])  # pushes t_a's key out
        moved = changed(before, readings(reader))
    finally:
        vault.dispose()
    assert moved[key("key_cache.evictions", reason="max_entries")] == 1


def test_each_eviction_reason_is_counted() -> None:
    reader = InMemoryMetricReader()
    now = [0.0]
    cache = DataKeyCache(
        max_age_seconds=10,
        max_entries=8,
        max_uses=2,
        clock=lambda: now[0],
        metrics=Metrics(MeterProvider([reader])),
    )

    def put(tenant: str, wrapped: str = "vault:v1:a") -> None:
        cache.put(DataKey(tenant, 1, bytes(32)), wrapped)

    put("t_age")
    now[0] = 11
    assert cache.get("t_age", 1) is None
    put("t_uses")  # put counts as a use: one more lookup is served
    assert cache.get("t_uses", 1) is not None
    assert cache.get("t_uses", 1) is None
    put("t_wrap")
    assert cache.get_or_load("t_wrap", 1, lambda: DataKey("t_wrap", 1, bytes(32)), wrapped="b")
    put("t_gone")
    cache.evict_tenant("t_gone")
    put("t_c1")
    cache.clear()  # t_wrap's reloaded key and t_c1's

    assert {
        attributes: value
        for (name, attributes), value in readings(reader).items()
        if name == "tenantvault.key_cache.evictions" and value
    } == {
        (("reason", "max_age"),): 1,
        (("reason", "max_uses"),): 1,
        (("reason", "wrapping_changed"),): 1,
        (("reason", "tenant_evicted"),): 1,
        (("reason", "cleared"),): 2,
    }


def test_an_unreachable_vault_counts_a_failed_call(
    app_settings: Settings,
    provider: CountingProvider,
    services: Services,
    reader: InMemoryMetricReader,
) -> None:
    setup = Vault.from_settings(app_settings, key_provider=provider)
    try:
        config = setup.create_config(
            "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": SECRET}
        )
    finally:
        setup.dispose()
    # The discard port: nothing listens there.
    client = hvac.Client(url="http://127.0.0.1:9", token=services.vault_token, timeout=1)
    unreachable = TransitKeyProvider(client, key_name="tenantvault-tests", timeout_seconds=0.2)
    vault = Vault.from_settings(
        app_settings, key_provider=unreachable, meter_provider=MeterProvider([reader])
    )
    try:
        with pytest.raises(KeyProviderUnavailable):
            vault.load_credentials("t_a", config.id)
    finally:
        vault.dispose()
    found = readings(reader)
    assert found[key("key_provider.calls", operation="unwrap", outcome="unavailable")] == 1
    assert key("key_provider.calls", operation="unwrap", outcome="ok") not in found
    assert found[key("key_cache.misses")] == 1
    assert_bounded(found, "t_a", config.id, SECRET)


def test_the_async_hot_path_records_its_loads(
    app_settings: Settings, provider: CountingProvider, reader: InMemoryMetricReader
) -> None:
    loop = LoopThread()
    vault = AsyncVault.from_settings(
        app_settings, key_provider=provider, meter_provider=MeterProvider([reader])
    )
    try:
        config = loop.run(
            vault.create_config(
                "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": SECRET}
            )
        )
        loop.run(vault.load_credentials("t_a", config.id))  # the key is cached after this
        before = readings(reader)
        loop.run(vault.load_credentials("t_a", config.id))
        moved = changed(before, readings(reader))
    finally:
        loop.run(vault.dispose())
        loop.close()
    assert moved == {
        key("key_cache.hits"): 1,
        key("credentials.load.duration"): 1,
    }


def test_a_global_provider_set_after_the_instruments_were_made_gets_them(
    app_settings: Settings, provider: CountingProvider, global_reader: InMemoryMetricReader
) -> None:
    vault = Vault.from_settings(app_settings, key_provider=provider)  # no meter_provider
    try:
        config = vault.create_config(
            "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": SECRET}
        )
        vault.load_credentials("t_a", config.id)
        before = readings(global_reader)
        vault.load_credentials("t_a", config.id)
        moved = changed(before, readings(global_reader))
    finally:
        vault.dispose()
    assert moved == {
        key("key_cache.hits"): 1,
        key("credentials.load.duration"): 1,
    }


def test_dek_rotation_counts_the_values_it_reseals(
    vault: Vault, operator_db: Any, provider: CountingProvider, global_reader: InMemoryMetricReader
) -> None:
    populate(vault, "t_a")
    before = readings(global_reader)
    report = rotate_data_keys(
        operator_db, fresh_keyring(provider), ["t_a"], DekRotationOptions(batch_size=2)
    )
    assert report.ok
    moved = changed(before, readings(global_reader))
    assert report.resealed > 2  # more than one batch
    assert moved[key("rotation.progress", kind="dek")] == report.resealed
    assert moved[key("rotation.tenants", outcome="rotated")] == 1
    assert_bounded(readings(global_reader), "t_a", "secret", "access", "refresh")


def test_kek_rotation_counts_the_keys_it_rewraps(
    app_settings: Settings,
    services: Services,
    operator_db: Any,
    global_reader: InMemoryMetricReader,
) -> None:
    # A transit key of its own: rotating it touches no other test's keys.
    own = transit_provider(services, key_name=f"kek-{uuid.uuid4().hex[:8]}")
    vault = Vault.from_settings(app_settings, key_provider=own)
    try:
        for tenant in ("t_a", "t_b"):
            populate(vault, tenant, configs=1)
    finally:
        vault.dispose()
    before = readings(global_reader)
    report = rotate_kek(operator_db, own, KekRotationOptions(batch_size=1))
    assert report.ok
    assert report.rewrapped == 2
    assert changed(before, readings(global_reader))[key("rotation.progress", kind="kek")] == 2
