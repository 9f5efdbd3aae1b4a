"""OpenBao stops: cached tenants keep loading, uncached ones fail fast and cleanly."""

from __future__ import annotations

import time
from pathlib import Path

import hvac
import pytest
import sqlalchemy as sa

from tenantvault import KeyProviderUnavailable, Vault
from tenantvault.dev import stack as devstack
from tenantvault.kms.transit import TransitKeyProvider
from tenantvault.settings import Settings

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}
TIMEOUT = 1.0


def test_outage_keeps_cached_tenants_loading_and_fails_the_rest_within_the_timeout(
    tmp_path: Path, app_settings: Settings, owner_engine: sa.Engine
) -> None:
    state = tmp_path / "own-openbao"
    environment = devstack.up(state, postgres=False).variables
    try:
        client = hvac.Client(
            url=environment["VAULT_ADDR"], token=environment["VAULT_TOKEN"], timeout=TIMEOUT
        )
        provider = TransitKeyProvider(client, key_name="outage", timeout_seconds=TIMEOUT)
        vault = Vault.from_settings(app_settings, key_provider=provider)
        cached = vault.create_config(
            "t_a", type="smtp", name="A", config=SMTP, credentials={"password": "pa"}
        )
        cold = vault.create_config(
            "t_b", type="smtp", name="B", config=SMTP, credentials={"password": "pb"}
        )
        vault.load_credentials("t_a", cached.id)  # the committed key enters the cache
        vault.keyring.cache.evict_tenant("t_b")
    finally:
        devstack.down(state)

    assert vault.load_credentials("t_a", cached.id).password.get_secret_value() == "pa"  # type: ignore[union-attr]

    started = time.monotonic()
    with pytest.raises(KeyProviderUnavailable):
        vault.load_credentials("t_b", cold.id)
    assert time.monotonic() - started < TIMEOUT + 1.0

    with owner_engine.connect() as connection:
        before = connection.execute(
            sa.text("SELECT count(*) FROM dripiq_app.email_provider_configs")
        ).scalar_one()
    with pytest.raises(KeyProviderUnavailable):
        vault.store_credentials("t_b", cold.id, {"password": "never-written"})
    with pytest.raises(KeyProviderUnavailable):
        vault.create_config(
            "t_b", type="smtp", name="C", config=SMTP, credentials={"password": "pc"}
        )
    with owner_engine.connect() as connection:
        after = connection.execute(
            sa.text("SELECT count(*) FROM dripiq_app.email_provider_configs")
        ).scalar_one()
        keys = connection.execute(
            sa.text("SELECT count(*) FROM dripiq_app.tenant_data_keys")
        ).scalar_one()
    assert (after, keys) == (before, 2)
    vault.dispose()
