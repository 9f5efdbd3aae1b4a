"""Data for the rotation tests: tenants with every kind of sealed value, and a reader
that opens everything back (as the application would) to compare plaintexts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from tenantvault import Vault

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}
GRAPH = {
    "azure_tenant_id": "contoso.onmicrosoft.com",
    "client_id": "0f0e0d0c-0b0a-4908-8706-050403020100",
    "scopes": ["https://graph.microsoft.com/.default"],
    "auth_type": "client_credentials",
}
# One token pair stored for a Graph config, as the hot-path tests of both facades store it.
GRAPH_TOKEN: dict[str, Any] = {
    "access_token": "access-one",
    "refresh_token": "refresh-one",
    "expires_at": datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
    "scopes": ["Mail.Send"],
}


def add_tenants(owner_engine: sa.Engine, tenants: list[str]) -> None:
    with owner_engine.begin() as connection:
        for tenant in tenants:
            connection.execute(
                sa.text(
                    "INSERT INTO dripiq_app.tenants (id, name) VALUES (:t, :t) "
                    "ON CONFLICT DO NOTHING"
                ),
                {"t": tenant},
            )


def populate(vault: Vault, tenant: str, configs: int = 3) -> dict[tuple[str, str], str]:
    """Configs with credentials (two versions each, so history holds sealed values too)
    and one OAuth token pair; returns what each place should open to."""
    expected: dict[tuple[str, str], str] = {}
    for n in range(configs):
        cfg = vault.create_config(
            tenant, type="smtp", name=f"smtp-{n}", config=SMTP, credentials={"password": f"p0-{n}"}
        )
        vault.store_credentials(tenant, cfg.id, {"password": f"{tenant}-secret-{n}"})
        expected[("cred", cfg.id)] = f"{tenant}-secret-{n}"
    graph = vault.create_config(
        tenant,
        type="microsoft_graph",
        name="graph",
        config=GRAPH,
        credentials={"client_secret": "cs"},
    )
    expected[("cred", graph.id)] = "cs"
    vault.store_oauth_token(
        tenant,
        graph.id,
        access_token=f"{tenant}-access",
        refresh_token=f"{tenant}-refresh",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    expected[("access", graph.id)] = f"{tenant}-access"
    expected[("refresh", graph.id)] = f"{tenant}-refresh"
    return expected


def open_everything(vault: Vault, tenant: str) -> dict[tuple[str, str], str]:
    """Every current credential and token of the tenant, opened; history versions too."""
    opened: dict[tuple[str, str], str] = {}
    for cfg in vault.list_active_configs(tenant):
        creds: Any = vault.load_credentials(tenant, cfg.id)
        secret = creds.password if cfg.type == "smtp" else creds.client_secret
        opened[("cred", cfg.id)] = secret.get_secret_value()
        for version in vault.list_config_versions(tenant, cfg.id):
            if version.has_credentials:
                kept: Any = vault.get_config_version(
                    tenant, cfg.id, version.version, with_credentials=True
                ).credentials
                assert kept is not None
        if cfg.type == "microsoft_graph":
            token = vault.load_oauth_token(tenant, cfg.id)
            assert token.access_token is not None
            assert token.refresh_token is not None
            opened[("access", cfg.id)] = token.access_token.get_secret_value()
            opened[("refresh", cfg.id)] = token.refresh_token.get_secret_value()
    return opened


def sealed_versions(owner_engine: sa.Engine, tenant: str) -> dict[int, int]:
    """How many sealed values of the tenant name each data key version."""
    query = """
        SELECT split_part(v, '.', 2)::int, count(*) FROM (
          SELECT encrypted_credentials v FROM dripiq_app.email_provider_configs WHERE tenant_id = :t
          UNION ALL SELECT encrypted_access_token FROM dripiq_app.email_provider_tokens WHERE tenant_id = :t
          UNION ALL SELECT encrypted_refresh_token FROM dripiq_app.email_provider_tokens WHERE tenant_id = :t
          UNION ALL SELECT encrypted_credentials FROM dripiq_app.email_provider_config_versions WHERE tenant_id = :t
        ) s WHERE v IS NOT NULL GROUP BY 1"""
    with owner_engine.connect() as connection:
        return {int(v): int(c) for v, c in connection.execute(sa.text(query), {"t": tenant})}


def _keys(owner_engine: sa.Engine, tenant: str, column: str) -> dict[int, Any]:
    """``column`` of each of the tenant's data keys, by version."""
    with owner_engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                f"SELECT version, {column} FROM dripiq_app.tenant_data_keys WHERE tenant_id = :t"
            ),
            {"t": tenant},
        )
        return {int(v): value for v, value in rows}


def key_states(owner_engine: sa.Engine, tenant: str) -> dict[int, str]:
    return {v: str(s) for v, s in _keys(owner_engine, tenant, "state").items()}


def kek_versions(owner_engine: sa.Engine, tenant: str) -> dict[int, int]:
    """The KEK version each of the tenant's data keys is wrapped under, by version."""
    return {v: int(k) for v, k in _keys(owner_engine, tenant, "kek_version").items()}
