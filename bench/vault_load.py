"""load_credentials and store_credentials against bare SQL, and against the naive peer.

All on the embedded stack (PostgreSQL 18 over loopback TCP, OpenBao dev), one run:

baseline     bare primary-key SELECT of the same config row: the same driver, a pool built the
             same way, one autocommit statement on the driver connection
load         Vault.load_credentials with a warm key cache (RLS on, application role)
naive        a peer that asks transit to decrypt the tenant's key on every load
store        Vault.store_credentials (validate, seal, write) vs a bare single-row UPDATE
vault calls  key-provider calls for 10,000 loads spread over 100 tenants, cold start
"""

from __future__ import annotations

import hvac
import sqlalchemy as sa

from tenantvault import Vault
from tenantvault.crypto.datakey import DataKey
from tenantvault.crypto.envelope import open_sealed
from tenantvault.db.session import create_engine
from tenantvault.keys.sealed import CONFIG_CREDENTIALS
from tenantvault.kms.transit import TransitKeyProvider

from ._harness import (
    measure,
    measure_interleaved,
    migrated_with_app_login,
    throwaway_database,
    vault_token,
)

TENANTS = 100
ITERATIONS = 3000
SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}


class Counting:
    def __init__(self, inner: TransitKeyProvider) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name: str) -> object:
        attribute = getattr(self.inner, name)
        if callable(attribute):

            def counted(*args: object, **kwargs: object) -> object:
                self.calls += 1
                return attribute(*args, **kwargs)

            return counted
        return attribute


def main() -> None:
    with throwaway_database() as (url, vault_addr):
        settings, app_settings = migrated_with_app_login(url, vault_addr, TENANTS)
        environment_token = vault_token()

        def provider() -> Counting:
            client = hvac.Client(url=vault_addr, token=environment_token, timeout=5)
            return Counting(TransitKeyProvider(client, key_name="bench"))

        vault = Vault.from_settings(app_settings, key_provider=provider())  # type: ignore[arg-type]
        ids = [
            vault.create_config(
                f"t{i}", type="smtp", name="Relay", config=SMTP, credentials={"password": f"pw-{i}"}
            ).id
            for i in range(1, TENANTS + 1)
        ]
        tenant, config_id = "t50", ids[49]

        bare_engine = create_engine(settings)
        # The same columns the load's function returns: the credentials are bound to
        # the config's version and config.
        select_sql = (
            "SELECT type, version, config, encrypted_credentials "
            "FROM dripiq_app.email_provider_configs WHERE id = %s"
        )

        def bare() -> object:
            # The floor: the driver connection from the same kind of pool, one
            # autocommit statement, no ORM or Core layers (as the load's hot path).
            pooled = bare_engine.raw_connection()
            try:
                driver = pooled.driver_connection
                driver.autocommit = True
                row = driver.execute(select_sql, (config_id,)).fetchone()
                driver.autocommit = False
            finally:
                pooled.close()
            return row

        def load() -> object:
            return vault.load_credentials(tenant, config_id)

        with bare_engine.connect() as connection:
            wrapped = connection.execute(
                sa.text("SELECT wrapped_key FROM dripiq_app.tenant_data_keys WHERE tenant_id = :t"),
                {"t": tenant},
            ).scalar_one()
        naive_provider = provider()

        def naive() -> object:
            row = bare()
            key = DataKey(tenant, 1, naive_provider.unwrap(tenant, wrapped))  # type: ignore[attr-defined]
            _, version, config, sealed = row  # type: ignore[misc]
            return open_sealed(
                key, sealed, CONFIG_CREDENTIALS.place(tenant, config_id, bound=(version, config))
            )

        update = sa.text(
            "UPDATE dripiq_app.email_provider_configs SET encrypted_credentials = encrypted_credentials WHERE id = :id"
        )

        def bare_update() -> object:
            with bare_engine.begin() as connection:
                return connection.execute(update, {"id": config_id})

        def store() -> object:
            vault.store_credentials(tenant, config_id, {"password": "pw-new"})
            return None

        reads = measure_interleaved(
            {"bare PK SELECT": bare, "load_credentials (warm)": load}, iterations=ITERATIONS
        )
        baseline, loaded = reads["bare PK SELECT"], reads["load_credentials (warm)"]
        naive_load = measure("naive: transit per load", naive, iterations=ITERATIONS // 3)
        update_baseline = measure("bare single-row UPDATE", bare_update, iterations=ITERATIONS // 3)
        stored = measure("store_credentials", store, iterations=ITERATIONS // 3)

        cold = Vault.from_settings(app_settings, key_provider=provider())  # type: ignore[arg-type]
        for n in range(10_000):
            i = n % TENANTS
            cold.load_credentials(f"t{i + 1}", ids[i])
        vault_calls = cold.keyring.provider.calls  # type: ignore[attr-defined]

        for engine in (bare_engine, vault.engine, cold.engine):
            engine.dispose()

    print(
        f"{baseline.name:<26} p50 {baseline.p50_us:8.1f} us  p99 {baseline.p99_us:8.1f} us  (baseline)"
    )
    print(
        f"{loaded.name:<26} p50 {loaded.p50_us:8.1f} us  p99 {loaded.p99_us:8.1f} us  ({loaded.ratio_to(baseline)}; target <= 1.5x)"
    )
    print(
        f"{naive_load.name:<26} p50 {naive_load.p50_us:8.1f} us  p99 {naive_load.p99_us:8.1f} us  "
        f"(load is {naive_load.p50_us / loaded.p50_us:.1f}x faster at p50; target >= 5x)"
    )
    print(
        f"{update_baseline.name:<26} p50 {update_baseline.p50_us:8.1f} us  p99 {update_baseline.p99_us:8.1f} us  (baseline)"
    )
    print(
        f"{stored.name:<26} p50 {stored.p50_us:8.1f} us  p99 {stored.p99_us:8.1f} us  ({stored.ratio_to(update_baseline)})"
    )
    print(
        f"{'vault calls':<26} {vault_calls} for 10,000 loads over {TENANTS} tenants, cold cache (target <= 100)"
    )


if __name__ == "__main__":
    main()
