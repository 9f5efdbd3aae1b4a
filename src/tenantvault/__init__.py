"""tenantvault: tenant-isolated, envelope-encrypted email-provider credentials."""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any

from tenantvault import _moved
from tenantvault.db.models import ProviderType
from tenantvault.errors import (
    ConcurrentModification,
    ConfigurationError,
    DecryptionError,
    InvalidInputError,
    KeyDestroyedError,
    KeyProviderError,
    KeyProviderUnavailable,
    NotFoundError,
    RotationError,
    TenantNotSetError,
    TenantVaultError,
)
from tenantvault.vault import (
    ConfigVersion,
    ExpiringToken,
    OAuthToken,
    OpenedConfig,
    ProviderConfig,
    RefreshedToken,
    Vault,
)
from tenantvault.vault.aio import AsyncVault
from tenantvault.vault.providers import CredentialsModel

_moved.install()

_default: Vault | None = None
_default_lock = threading.Lock()


def default_vault() -> Vault:
    """The process-wide ``Vault`` built from settings on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Vault.from_settings()
        return _default


def store_credentials(tenant_id: str, config_id: str, credentials: Any, **options: Any) -> int:
    """``Vault.store_credentials`` on the default vault (``actor``, ``reason``,
    ``expected_version`` as there); returns the config's new version."""
    return default_vault().store_credentials(tenant_id, config_id, credentials, **options)


def load_credentials(tenant_id: str, config_id: str) -> CredentialsModel:
    """``Vault.load_credentials`` on the default vault."""
    return default_vault().load_credentials(tenant_id, config_id)


# One default AsyncVault per event loop: its pooled connections belong to the loop
# that made them. An entry goes with its loop.
_default_async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncVault] = (
    weakref.WeakKeyDictionary()
)


def default_async_vault() -> AsyncVault:
    """The running event loop's ``AsyncVault``, built from settings on first use."""
    loop = asyncio.get_running_loop()
    with _default_lock:
        built = _default_async.get(loop)
        if built is None:
            built = _default_async[loop] = AsyncVault.from_settings()
        return built


async def async_store_credentials(
    tenant_id: str, config_id: str, credentials: Any, **options: Any
) -> int:
    """``AsyncVault.store_credentials`` on the default async vault (``actor``, ``reason``,
    ``expected_version`` as there); returns the config's new version."""
    return await default_async_vault().store_credentials(
        tenant_id, config_id, credentials, **options
    )


async def async_load_credentials(tenant_id: str, config_id: str) -> CredentialsModel:
    """``AsyncVault.load_credentials`` on the default async vault."""
    return await default_async_vault().load_credentials(tenant_id, config_id)


__all__ = [
    "AsyncVault",
    "ConcurrentModification",
    "ConfigVersion",
    "ConfigurationError",
    "CredentialsModel",
    "DecryptionError",
    "ExpiringToken",
    "InvalidInputError",
    "KeyDestroyedError",
    "KeyProviderError",
    "KeyProviderUnavailable",
    "NotFoundError",
    "OAuthToken",
    "OpenedConfig",
    "ProviderConfig",
    "ProviderType",
    "RefreshedToken",
    "RotationError",
    "TenantNotSetError",
    "TenantVaultError",
    "Vault",
    "async_load_credentials",
    "async_store_credentials",
    "default_async_vault",
    "default_vault",
    "load_credentials",
    "store_credentials",
]
