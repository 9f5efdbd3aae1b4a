"""The hot path against its physical floor, store against a bare UPDATE, the naive peer.

All on the embedded stack (PostgreSQL 18 over loopback TCP, OpenBao), one run, each
pair interleaved so machine noise falls on both alike:

floor         a prepared primary-key SELECT of the same row on a held connection (its
              cursor kept, autocommit), over the same socket: no pool, no RLS (the
              owner reads), no Python around it
load          Vault.load_credentials, warm key cache (RLS on, the application role)
token         Vault.load_oauth_token against the floor's SELECT of the token row
open          Vault.open_config (a Graph config, its credentials and its token, verified
              together) against the floor's SELECT of the config row joined to its token row
joined        load_credentials(session=...) in the caller's open transaction, against
              the caller's own prepared SELECT of the row in that transaction
naive         a peer that asks transit to decrypt the tenant's key on every load
store         Vault.store_credentials (validate, seal, write) vs a bare single-row UPDATE
vault calls   key-provider calls for 10,000 loads spread over 100 tenants, cold start
"""

from __future__ import annotations

from typing import Any

import hvac
import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tenantvault import Vault
from tenantvault.crypto.datakey import DataKey
from tenantvault.crypto.envelope import open_sealed
from tenantvault.db.session import create_engine, set_tenant
from tenantvault.keys.sealed import CONFIG_CREDENTIALS
from tenantvault.kms.transit import TransitKeyProvider

from ._harness import (
    CONFIG_ROW,
    SMTP,
    line,
    measure,
    measure_interleaved,
    migrated_with_app_login,
    throwaway_database,
    vault_token,
)

TENANTS = 100
ITERATIONS = 5000
GRAPH = {
    "azure_tenant_id": "contoso.onmicrosoft.com",
    "client_id": "0f0e0d0c-0b0a-4908-8706-050403020100",
    "scopes": ["https://graph.microsoft.com/.default"],
    "auth_type": "client_credentials",
}
# What open_config reads, as the owner would read it: the config row and its token row.
OPEN_ROW = (
    "SELECT c.type, c.name, c.config, c.is_default, c.is_active, c.created_at, c.updated_at, "
    "c.version, c.encrypted_credentials, t.id, t.version, t.token_type, t.expires_at, t.scopes, "
    "t.encrypted_access_token, t.encrypted_refresh_token FROM dripiq_app.email_provider_configs c "
    "LEFT JOIN dripiq_app.email_provider_tokens t ON t.tenant_id = c.tenant_id "
    "AND t.config_id = c.id WHERE c.id = %s"
)
GRANT_ROW = (
    "SELECT id, version, token_type, expires_at, scopes, encrypted_access_token, "
    "encrypted_refresh_token FROM dripiq_app.email_provider_tokens WHERE config_id = %s"
)


class Counting:
    def __init__(self, inner: TransitKeyProvider) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if callable(attribute):

            def counted(*args: object, **kwargs: object) -> object:
                self.calls += 1
                return attribute(*args, **kwargs)

            return counted
        return attribute


def prepared_select(cursor: Any, statement: str, parameter: str) -> Any:
    """The floor: one prepared statement on a cursor already open."""
    cursor.execute(statement, (parameter,), prepare=True)
    return cursor.fetchone()


def main() -> None:
    with throwaway_database() as (url, vault_addr):
        settings, app_settings = migrated_with_app_login(url, vault_addr, TENANTS)
        environment_token = vault_token()

        def provider() -> Counting:
            client = hvac.Client(url=vault_addr, token=environment_token, timeout=5)
            return Counting(TransitKeyProvider(client, key_name="bench"))

        vault = Vault.from_settings(app_settings, key_provider=provider())
        ids = [
            vault.create_config(
                f"t{i}", type="smtp", name="Relay", config=SMTP, credentials={"password": f"pw-{i}"}
            ).id
            for i in range(1, TENANTS + 1)
        ]
        tenant, config_id = "t50", ids[49]
        graph_id = vault.create_config(
            tenant,
            type="microsoft_graph",
            name="Graph",
            config=GRAPH,
            credentials={"client_secret": "graph-secret"},
        ).id
        vault.store_oauth_token(
            tenant,
            graph_id,
            access_token="bench-access",  # noqa: S106 (a made-up token)
            refresh_token="bench-refresh",  # noqa: S106
            scopes=["Mail.Send"],
        )

        # The floor's connection: held, autocommit, its cursor kept, the same socket.
        floor = psycopg.connect(url, autocommit=True)
        floor_cursor = floor.cursor()

        hot = measure_interleaved(
            {
                "floor: prepared PK SELECT": lambda: prepared_select(
                    floor_cursor, CONFIG_ROW, config_id
                ),
                "load_credentials (warm)": lambda: vault.load_credentials(tenant, config_id),
                "floor: prepared token SELECT": lambda: prepared_select(
                    floor_cursor, GRANT_ROW, graph_id
                ),
                "load_oauth_token (warm)": lambda: vault.load_oauth_token(tenant, graph_id),
                "floor: prepared config+token SELECT": lambda: prepared_select(
                    floor_cursor, OPEN_ROW, graph_id
                ),
                "open_config (warm)": lambda: vault.open_config(tenant, graph_id),
            },
            iterations=ITERATIONS,
        )

        # Joined to the caller's transaction: the caller's own SELECT in it is the floor.
        with Session(vault.engine) as session, session.begin():
            set_tenant(session.connection(), tenant)
            caller_cursor: Any = session.connection().connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            joined = measure_interleaved(
                {
                    "floor: caller's SELECT in its tx": lambda: prepared_select(
                        caller_cursor, CONFIG_ROW, config_id
                    ),
                    "load_credentials(session=...)": lambda: vault.load_credentials(
                        tenant, config_id, session=session
                    ),
                },
                iterations=ITERATIONS,
            )

        bare_engine = create_engine(settings)
        with bare_engine.connect() as connection:
            wrapped = connection.execute(
                sa.text("SELECT wrapped_key FROM dripiq_app.tenant_data_keys WHERE tenant_id = :t"),
                {"t": tenant},
            ).scalar_one()
        naive_provider = provider()

        def naive() -> object:
            kind, version, config, sealed = prepared_select(floor_cursor, CONFIG_ROW, config_id)
            key = DataKey(tenant, 1, naive_provider.unwrap(tenant, wrapped))
            return open_sealed(
                key,
                sealed,
                CONFIG_CREDENTIALS.place(tenant, config_id, bound=(kind, version), config=config),
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

        naive_load = measure("naive: transit per load", naive, iterations=ITERATIONS // 5)
        update_baseline = measure("bare single-row UPDATE", bare_update, iterations=1000)
        stored = measure("store_credentials", store, iterations=1000)

        counted = provider()
        cold = Vault.from_settings(app_settings, key_provider=counted)
        for n in range(10_000):
            i = n % TENANTS
            cold.load_credentials(f"t{i + 1}", ids[i])
        vault_calls = counted.calls

        floor.close()
        bare_engine.dispose()
        vault.dispose()
        cold.dispose()

    target = "; target <= 1.5x, aim 1.2x"
    loaded = hot["load_credentials (warm)"]
    print(line(hot["floor: prepared PK SELECT"]))
    print(line(loaded, hot["floor: prepared PK SELECT"], target=target))
    print(line(hot["floor: prepared token SELECT"]))
    print(line(hot["load_oauth_token (warm)"], hot["floor: prepared token SELECT"], target=target))
    print(line(hot["floor: prepared config+token SELECT"]))
    print(
        line(hot["open_config (warm)"], hot["floor: prepared config+token SELECT"], target=target)
    )
    print(line(joined["floor: caller's SELECT in its tx"]))
    print(
        line(
            joined["load_credentials(session=...)"],
            joined["floor: caller's SELECT in its tx"],
            target=target,
        )
    )
    print(
        f"{naive_load.name:<34} p50 {naive_load.p50_us:8.1f} us  p99 {naive_load.p99_us:8.1f} us  "
        f"(load is {naive_load.p50_us / loaded.p50_us:.1f}x faster at p50; target >= 5x)"
    )
    print(line(update_baseline).replace("(floor)", "(baseline)"))
    print(line(stored, update_baseline))
    print(
        f"{'vault calls':<34} {vault_calls} for 10,000 loads over {TENANTS} tenants, cold cache "
        "(target <= 100)"
    )


if __name__ == "__main__":
    main()
