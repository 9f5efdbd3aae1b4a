"""The facade tests run against both facades: ``vault`` is a ``Vault``, then an
``AsyncVault`` behind Vault's sync face (tests/async_support.py). A test about the
sync API only (joining a sync ``Session``) asks for ``sync_vault``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import Vault
from tenantvault.settings import Settings
from tests.async_support import sync_looking_async_vault
from tests.conftest import CountingProvider

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}
FACADES = ["Vault", "AsyncVault"]

VaultFactory = Callable[..., AbstractContextManager[Any]]


@contextmanager
def _sync(settings: Settings, key_provider: Any, **options: Any) -> Iterator[Vault]:
    built = Vault.from_settings(settings, key_provider=key_provider)
    if options:
        built = Vault(built.engine, built.keyring, **options)
    try:
        yield built
    finally:
        built.dispose()


@pytest.fixture(params=FACADES)
def make_vault(request: pytest.FixtureRequest) -> VaultFactory:
    """Builds the facade under test: ``make_vault(settings, provider, **options)`` is a
    context manager yielding a Vault, or an AsyncVault with Vault's face."""
    return _sync if request.param == "Vault" else sync_looking_async_vault


@pytest.fixture
def vault(
    make_vault: VaultFactory, app_settings: Settings, provider: CountingProvider
) -> Iterator[Any]:
    with make_vault(app_settings, provider) as built:
        yield built


@pytest.fixture
def sync_vault(app_settings: Settings, provider: CountingProvider) -> Iterator[Vault]:
    with _sync(app_settings, provider) as built:
        yield built


def password(credentials: Any) -> str:
    return str(credentials.password.get_secret_value())


@pytest.fixture
def tenants(app_settings: Settings, owner_engine: sa.Engine) -> list[str]:
    """100 tenant rows beside t_a and t_b (in the migrated database)."""
    names = [f"t{i:03d}" for i in range(100)]
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO dripiq_app.tenants (id, name) VALUES (:t, :t)"),
            [{"t": name} for name in names],
        )
    return names


@pytest.fixture
def seeded(
    tenants: list[str], app_settings: Settings, provider: CountingProvider
) -> dict[str, str]:
    """One SMTP config with credentials per tenant, made through the sync Vault (closed
    before the test starts): {tenant: config id}."""
    vault = Vault.from_settings(app_settings, key_provider=provider)
    try:
        return {
            tenant: vault.create_config(
                tenant, type="smtp", name="Relay", config=SMTP, credentials={"password": tenant}
            ).id
            for tenant in tenants
        }
    finally:
        vault.dispose()
