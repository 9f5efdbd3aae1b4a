"""What metrics cost the hot path: load_credentials without and with an SDK.

On the embedded stack, one run, interleaved so machine noise falls on both alike:

no SDK        Vault.load_credentials, warm key cache, no MeterProvider set: the
              OpenTelemetry API's no-op instruments (what an application without an
              SDK pays); the baseline
no SDK again  a second Vault like the first: what the two plain vaults differ by is
              the noise the SDK's cost is read against
SDK           the same load on a Vault given the SDK's MeterProvider with an
              in-memory reader: the load's duration recorded on every call (the key
              cache's hit is a plain integer, read only when the SDK collects)

The vaults share the database, the tenant and the config; each has its own held
connections and key cache.
"""

from __future__ import annotations

import hvac
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from tenantvault import Vault
from tenantvault.kms.transit import TransitKeyProvider

from ._harness import (
    SMTP,
    measure_interleaved,
    migrated_with_app_login,
    throwaway_database,
    vault_token,
)

ITERATIONS = 5000


def main() -> None:
    with throwaway_database() as (url, vault_addr):
        _, app_settings = migrated_with_app_login(url, vault_addr, tenants=1)
        client = hvac.Client(url=vault_addr, token=vault_token(), timeout=5)
        provider = TransitKeyProvider(client, key_name="bench")
        reader = InMemoryMetricReader()
        plain = Vault.from_settings(app_settings, key_provider=provider)
        again = Vault.from_settings(app_settings, key_provider=provider)
        metered = Vault.from_settings(
            app_settings, key_provider=provider, meter_provider=MeterProvider([reader])
        )
        config_id = plain.create_config(
            "t1", type="smtp", name="Relay", config=SMTP, credentials={"password": "pw"}
        ).id

        timings = measure_interleaved(
            {
                "load_credentials, no SDK": lambda: plain.load_credentials("t1", config_id),
                "load_credentials, no SDK again": lambda: again.load_credentials("t1", config_id),
                "load_credentials, SDK + reader": lambda: metered.load_credentials("t1", config_id),
            },
            iterations=ITERATIONS,
        )
        recorded = reader.get_metrics_data()
        plain.dispose()
        again.dispose()
        metered.dispose()

    baseline = timings["load_credentials, no SDK"]
    noise = timings["load_credentials, no SDK again"]
    with_sdk = timings["load_credentials, SDK + reader"]
    # The reader saw every measured load: the SDK really did the work being timed.
    points = [
        point
        for resource in (recorded.resource_metrics if recorded else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "tenantvault.credentials.load.duration"
        for point in metric.data.data_points
    ]
    loads = sum(point.count for point in points if isinstance(point, HistogramDataPoint))
    for timing in (baseline, noise, with_sdk):
        print(f"{timing.name:<32} p50 {timing.p50_us:8.1f} us  p99 {timing.p99_us:8.1f} us")
    print(f"noise, no SDK against no SDK: {noise.ratio_to(baseline)}")
    print(f"SDK against no SDK: {with_sdk.ratio_to(baseline)}; aim: within noise (a few %)")
    print(f"loads the SDK recorded: {loads} (warm-up included)")


if __name__ == "__main__":
    main()
