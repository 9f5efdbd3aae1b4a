"""KMS requests with tenants' own KEKs, against one request per tenant in the same run.

On the embedded stack (PostgreSQL 18, OpenBao dev): TENANTS tenants, half under the
deployment's KEK and half spread over CUSTOMER_KEYS tenant KEKs (transit keys), one
data key and one sealed SendGrid credential each. HTTP requests are counted as they
leave for OpenBao (one hvac client, shared by every KEK's provider).

cold warm-up   Vault.warm(every tenant) from a cold cache, then one load per tenant:
               requests, against the same loads one at a time with no warm-up (the
               baseline: one unwrap request per tenant).
tenant KEK     the owner rotates one tenant KEK; `rotate-keys kek --key REF --no-rotate`
               rewraps its tenants' keys: requests, against one per key.
"""

from __future__ import annotations

import base64
import os

import psycopg

from tenantvault import Vault
from tenantvault.crypto.datakey import DataKey
from tenantvault.crypto.envelope import seal
from tenantvault.db.ids import new_id
from tenantvault.db.operator import OperatorDatabase
from tenantvault.keys.sealed import CONFIG_CREDENTIALS
from tenantvault.kms.keks import Keks, split_ref
from tenantvault.kms.provider import KeyProvider
from tenantvault.kms.transit import TransitKeyProvider
from tenantvault.rotation.kek import rotate_kek
from tenantvault.rotation.options import KekRotationOptions
from tenantvault.settings import Settings

from ._harness import copy_rows, migrated_with_app_login, throwaway_database
from .warm import CREDENTIALS, _provider

TENANTS = 1_000
CUSTOMER_KEYS = 10
DEFAULT_KEY = "bench-keks-default"


def _key_of(index: int) -> str:
    """Tenants 't1'..: the first half under the deployment's KEK, the rest spread."""
    if index <= TENANTS // 2:
        return DEFAULT_KEY
    return f"bench-customer-{index % CUSTOMER_KEYS}"


def _seed(settings: Settings, provider: TransitKeyProvider) -> dict[str, str]:
    """Each tenant's data key wrapped by its KEK, a sealed config each; tenant_keks rows
    for the tenants of customer keys. Returns {tenant: config id}."""
    transit = provider._client.secrets.transit
    by_key: dict[str, list[str]] = {}
    for index in range(1, TENANTS + 1):
        by_key.setdefault(_key_of(index), []).append(f"t{index}")
    keys, configs, own, ids = [], [], [], {}
    for key, tenants in by_key.items():
        transit.create_key(name=key, derived=True)
        for start in range(0, len(tenants), 200):
            batch = tenants[start : start + 200]
            plaintexts = [os.urandom(32) for _ in batch]
            items = [
                {
                    "plaintext": base64.b64encode(p).decode(),
                    "context": base64.b64encode(t.encode()).decode(),
                }
                for t, p in zip(batch, plaintexts, strict=True)
            ]
            answered = transit.encrypt_data(name=key, plaintext="", batch_input=items)
            results = answered["data"]["batch_results"]
            for tenant, plaintext, item in zip(batch, plaintexts, results, strict=True):
                keys.append((tenant, 1, item["ciphertext"], 1, f"transit:{key}"))
                config_id = ids[tenant] = new_id()
                place = CONFIG_CREDENTIALS.place(
                    tenant, config_id, bound=("sendgrid", 1), config={}
                )
                sealed = seal(DataKey(tenant, 1, plaintext), CREDENTIALS, place)
                configs.append((config_id, tenant, "sendgrid", "Relay", "{}", sealed))
                if key != DEFAULT_KEY:
                    own.append((tenant, f"transit:{key}"))
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
        copy_rows(connection, "tenant_keks", "tenant_id, kek_ref", own)
        connection.commit()
        connection.autocommit = True
        connection.execute("VACUUM ANALYZE")
    return ids


def _vault(app_settings: Settings, provider: TransitKeyProvider) -> Vault:
    """A cold process whose every KEK's provider shares ``provider``'s counted client."""
    vault = Vault.from_settings(app_settings, key_provider=provider)

    def resolve(ref: str) -> KeyProvider:
        return provider.for_key(split_ref(ref)[1])

    vault.keyring.keks = Keks(vault.keyring.provider, resolve)
    return vault


def main() -> None:
    with throwaway_database() as (url, vault_addr):
        settings, app_settings = migrated_with_app_login(url, vault_addr, TENANTS)
        app_settings = app_settings.model_copy(update={"transit_key": DEFAULT_KEY})
        seeder, _ = _provider(vault_addr)
        ids = _seed(settings, seeder)

        provider, session = _provider(vault_addr)
        warm = _vault(app_settings, provider)
        report = warm.warm(list(ids))
        assert report.ok, report
        warm_requests = session.sent
        for tenant, config_id in ids.items():
            warm.load_credentials(tenant, config_id)
        assert session.sent == warm_requests  # every load served from the cache
        warm.dispose()

        provider, session = _provider(vault_addr)
        cold = _vault(app_settings, provider)
        for tenant, config_id in ids.items():
            cold.load_credentials(tenant, config_id)
        one_at_a_time = session.sent
        cold.dispose()

        rotated_key = "bench-customer-3"
        seeder._client.secrets.transit.rotate_key(name=rotated_key)
        under = sum(1 for i in range(1, TENANTS + 1) if _key_of(i) == rotated_key)
        provider, session = _provider(vault_addr)
        db = OperatorDatabase.from_settings(settings)
        try:
            kek = rotate_kek(db, provider.for_key(rotated_key), KekRotationOptions(rotate=False))
        finally:
            db.dispose()
        assert kek.ok, kek
        assert kek.rewrapped == under, kek
    keks = CUSTOMER_KEYS + 1
    print(
        f"cold process, {TENANTS:,} tenants over {keks} KEKs ({TENANTS // 2} under the "
        f"deployment's, {TENANTS // 2 // CUSTOMER_KEYS} under each of {CUSTOMER_KEYS} tenant "
        f"KEKs): warm() {warm_requests} KMS requests, then {TENANTS:,} loads 0; "
        f"one at a time: {one_at_a_time:,} requests (the baseline) = "
        f"{one_at_a_time / warm_requests:.0f}x fewer (each KEK: one check of the key, then "
        "ceil(keys / 200) batch unwraps)"
    )
    print(
        f"rotation of one tenant KEK ({rotated_key}, {under} data keys under it): "
        f"{session.sent} KMS requests to rewrap them all, against {under} one per key "
        f"= {under / max(session.sent, 1):.1f}x fewer"
    )


if __name__ == "__main__":
    main()
