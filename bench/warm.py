"""Fleet warm-up and the backoff during an outage, each against its baseline in the same run.

All on the embedded stack (PostgreSQL 18 over loopback TCP, OpenBao dev):

warm-up   10,000 tenants (one key and one sealed SendGrid credential each), from a
          cold cache: Vault.warm(all) then one load per tenant, against the same loads
          with no warm-up (one at a time: each first load unwraps its tenant's key).
          Vault calls are HTTP requests counted as they leave for OpenBao.
outage    Vault unreachable (the provider, its transit key checked, pointed at a port
          nobody listens on; transit timeout 0.5 s) for
          OUTAGE_SECONDS while THREADS threads load cold tenants without pause: calls
          that reached for Vault against misses attempted, with the default backoff and
          without it (the baseline: a gate that never shuts, every miss calls Vault).
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hvac
import psycopg
import requests

from tenantvault import Vault
from tenantvault.crypto.datakey import DataKey
from tenantvault.crypto.envelope import seal
from tenantvault.db.ids import new_id
from tenantvault.errors import KeyProviderUnavailable
from tenantvault.keys.backoff import ProviderBackoff
from tenantvault.keys.sealed import CONFIG_CREDENTIALS
from tenantvault.kms.transit import TransitKeyProvider
from tenantvault.settings import Settings

from ._harness import copy_rows, migrated_with_app_login, throwaway_database, vault_token

TENANTS = 10_000
TRANSIT_KEY = "bench-warm"
KEK_REF = f"transit:{TRANSIT_KEY}"
CREDENTIALS = b'{"api_key":"SG.benchmarkid.benchmarksecretbenchmarksecret00"}'
OUTAGE_SECONDS = 5.0
THREADS = 16


class CountingSession(requests.Session):
    """Counts the HTTP requests an hvac client sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self._lock = threading.Lock()

    def request(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.sent += 1
        return super().request(*args, **kwargs)


def _provider(
    vault_addr: str, *, timeout: float = 30
) -> tuple[TransitKeyProvider, CountingSession]:
    session = CountingSession()
    client = hvac.Client(url=vault_addr, token=vault_token(), timeout=timeout, session=session)
    return TransitKeyProvider(client, key_name=TRANSIT_KEY, timeout_seconds=timeout), session


def _seed(settings: Settings, vault_addr: str) -> dict[str, str]:
    """One wrapped key (transit's batch encrypt) and one sealed config per tenant 't1'...;
    returns {tenant: config id}."""
    provider, _ = _provider(vault_addr)
    provider.ensure_key()
    tenants = [f"t{i}" for i in range(1, TENANTS + 1)]
    keys, configs, ids = [], [], {}
    for start in range(0, TENANTS, 200):
        batch = tenants[start : start + 200]
        plaintexts = [os.urandom(32) for _ in batch]
        items = [
            {
                "plaintext": base64.b64encode(p).decode(),
                "context": base64.b64encode(t.encode()).decode(),
            }
            for t, p in zip(batch, plaintexts, strict=True)
        ]
        answered = provider._client.secrets.transit.encrypt_data(
            name=TRANSIT_KEY, plaintext="", batch_input=items
        )["data"]["batch_results"]
        for tenant, plaintext, item in zip(batch, plaintexts, answered, strict=True):
            keys.append((tenant, 1, item["ciphertext"], 1, KEK_REF))
            config_id = ids[tenant] = new_id()
            place = CONFIG_CREDENTIALS.place(tenant, config_id, bound=("sendgrid", 1), config={})
            sealed = seal(DataKey(tenant, 1, plaintext), CREDENTIALS, place)
            configs.append((config_id, tenant, "sendgrid", "Relay", "{}", sealed))
    url = settings.sqlalchemy_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as connection:
        copy_rows(
            connection,
            "tenant_data_keys",
            "tenant_id, version, wrapped_key, kek_version, kek_ref",
            keys,
        )
        copy_rows(
            connection,
            "email_provider_configs",
            "id, tenant_id, type, name, config, encrypted_credentials",
            configs,
        )
        connection.commit()
        connection.autocommit = True
        connection.execute("VACUUM ANALYZE")
    return ids


def _load_all(vault: Vault, ids: dict[str, str]) -> float:
    started = time.perf_counter()
    for tenant, config_id in ids.items():
        vault.load_credentials(tenant, config_id)
    return time.perf_counter() - started


def _warm_up(app_settings: Settings, vault_addr: str, ids: dict[str, str]) -> list[str]:
    settings = app_settings.model_copy(update={"dek_cache_max_entries": 2 * TENANTS})
    provider, session = _provider(vault_addr)
    provider.ensure_key()

    warm_vault = Vault.from_settings(settings, key_provider=provider)
    sent = session.sent
    started = time.perf_counter()
    report = warm_vault.warm(list(ids))
    warmed = time.perf_counter() - started
    warm_calls = session.sent - sent
    assert report.ok, report
    assert report.warmed == TENANTS, report
    loads_after = _load_all(warm_vault, ids)
    assert session.sent - sent == warm_calls  # the loads called nothing
    warm_vault.dispose()

    cold_vault = Vault.from_settings(settings, key_provider=provider)
    sent = session.sent
    one_at_a_time = _load_all(cold_vault, ids)
    cold_calls = session.sent - sent
    cold_vault.dispose()
    total = warmed + loads_after
    return [
        f"warm-up {TENANTS:,} tenants from cold: warm() {warm_calls} Vault calls, "
        f"{warmed:.2f} s; then {TENANTS:,} loads {loads_after:.2f} s, 0 calls "
        f"(total {total:.2f} s)",
        f"one at a time (same loads, no warm-up): {cold_calls:,} Vault calls, "
        f"{one_at_a_time:.2f} s",
        f"= {cold_calls / max(warm_calls, 1):.0f}x fewer calls, "
        f"{one_at_a_time / total:.1f}x faster to serve every tenant once "
        f"(target: at most ceil({TENANTS:,} / 200) = {-(-TENANTS // 200)} calls)",
    ]


class _NoBackoff(ProviderBackoff):
    """The baseline: a gate that never shuts, so every miss calls Vault (as before it)."""

    @contextmanager
    def call(self, what: str) -> Iterator[None]:
        yield


def _dead_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def _outage(app_settings: Settings, vault_addr: str, ids: dict[str, str], *, backoff: bool) -> str:
    """Calls that reached for Vault while THREADS threads miss for OUTAGE_SECONDS."""
    provider, session = _provider(vault_addr, timeout=0.5)
    # A running process checked its transit key before Vault went down (until then the
    # check holds a lock, and calls would queue behind it rather than reach Vault).
    provider.ensure_key()
    provider._client.url = _dead_address()
    session.sent = 0
    calls = [0]
    real_unwrap = provider.unwrap

    def counted_unwrap(tenant_id: str, wrapped: str) -> bytes:
        calls[0] += 1  # under the GIL: a plain counter is exact enough here
        return real_unwrap(tenant_id, wrapped)

    provider.unwrap = counted_unwrap  # type: ignore[method-assign]
    vault = Vault.from_settings(app_settings, key_provider=provider)
    if not backoff:
        vault.keyring.backoff = _NoBackoff()
    pairs = list(ids.items())
    misses = [0] * THREADS
    deadline = time.monotonic() + OUTAGE_SECONDS

    def worker(index: int) -> None:
        n = index
        while time.monotonic() < deadline:
            tenant, config_id = pairs[n % len(pairs)]
            n += THREADS
            try:
                vault.load_credentials(tenant, config_id)
            except KeyProviderUnavailable:
                misses[index] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    vault.dispose()
    label = "default backoff (1 s doubling to 30 s)" if backoff else "no backoff (the baseline)"
    return (
        f"outage {OUTAGE_SECONDS:g} s, {THREADS} threads, {label}: {sum(misses):,} misses "
        f"attempted, {calls[0]} unwrap calls reached for Vault ({session.sent} HTTP attempts)"
    )


def main() -> None:
    with throwaway_database() as (url, vault_addr):
        settings, app_settings = migrated_with_app_login(url, vault_addr, TENANTS)
        app_settings = app_settings.model_copy(update={"transit_key": TRANSIT_KEY})
        ids = _seed(settings, vault_addr)
        lines = _warm_up(app_settings, vault_addr, ids)
        lines.append(_outage(app_settings, vault_addr, ids, backoff=True))
        lines.append(_outage(app_settings, vault_addr, ids, backoff=False))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
