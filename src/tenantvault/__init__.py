"""tenantvault: tenant-isolated, envelope-encrypted email-provider credentials.

The facade and its models load on first use (``tenantvault.Vault``, ``from tenantvault
import Vault``): importing the package, or running ``tenantvault --version``, does not
import SQLAlchemy, hvac and pydantic.
"""

from __future__ import annotations

import importlib
import threading
import weakref
from typing import TYPE_CHECKING, Any

from tenantvault import _moved
from tenantvault.errors import (
    ConcurrentModification,
    ConfigurationError,
    DatabaseError,
    DatabaseTimeout,
    DatabaseUnavailable,
    DecryptionError,
    InvalidInputError,
    KeyDestroyedError,
    KeyProviderError,
    KeyProviderUnavailable,
    NotFoundError,
    OAuthProviderError,
    OAuthProviderUnavailable,
    ReconsentRequired,
    RotationError,
    SchemaNotMigrated,
    TenantKeyUnavailable,
    TenantNotSetError,
    TenantVaultError,
)

if TYPE_CHECKING:
    import asyncio

    from tenantvault.db.models import ProviderType
    from tenantvault.vault import (
        AuthorizationRequest,
        ConfigVersion,
        ExpiringToken,
        OAuthToken,
        OpenedConfig,
        ProviderConfig,
        RefreshedToken,
        TokenEvent,
        Vault,
    )
    from tenantvault.vault.aio import AsyncVault
    from tenantvault.vault.providers import (
        CredentialsModel,
        GoogleWorkspaceConfig,
        GoogleWorkspaceCredentials,
        MicrosoftGraphConfig,
        MicrosoftGraphCredentials,
        ProviderConfigModel,
        SendGridConfig,
        SendGridCredentials,
        SmtpConfig,
        SmtpCredentials,
    )

_moved.install()

# Each public name that is imported on first use, and the module that defines it.
_LAZY = {
    "ProviderType": "tenantvault.db.models",
    "AuthorizationRequest": "tenantvault.vault",
    "ConfigVersion": "tenantvault.vault",
    "ExpiringToken": "tenantvault.vault",
    "OAuthToken": "tenantvault.vault",
    "OpenedConfig": "tenantvault.vault",
    "ProviderConfig": "tenantvault.vault",
    "RefreshedToken": "tenantvault.vault",
    "TokenEvent": "tenantvault.vault",
    "Vault": "tenantvault.vault",
    "AsyncVault": "tenantvault.vault.aio",
    "CredentialsModel": "tenantvault.vault.providers",
    "GoogleWorkspaceConfig": "tenantvault.vault.providers",
    "GoogleWorkspaceCredentials": "tenantvault.vault.providers",
    "MicrosoftGraphConfig": "tenantvault.vault.providers",
    "MicrosoftGraphCredentials": "tenantvault.vault.providers",
    "ProviderConfigModel": "tenantvault.vault.providers",
    "SendGridConfig": "tenantvault.vault.providers",
    "SendGridCredentials": "tenantvault.vault.providers",
    "SmtpConfig": "tenantvault.vault.providers",
    "SmtpCredentials": "tenantvault.vault.providers",
}


def __getattr__(name: str) -> Any:
    """A lazily imported public name, kept in the module once imported; or a
    subpackage (``tenantvault.db``), as importing the facade used to load them all."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as missing:
        if missing.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


_default: Vault | None = None
_default_lock = threading.Lock()


def default_vault() -> Vault:
    """The process-wide ``Vault`` built from settings on first use."""
    global _default
    from tenantvault.vault import Vault

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
    import asyncio

    from tenantvault.vault.aio import AsyncVault

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
    "AuthorizationRequest",
    "ConcurrentModification",
    "ConfigVersion",
    "ConfigurationError",
    "CredentialsModel",
    "DatabaseError",
    "DatabaseTimeout",
    "DatabaseUnavailable",
    "DecryptionError",
    "ExpiringToken",
    "GoogleWorkspaceConfig",
    "GoogleWorkspaceCredentials",
    "InvalidInputError",
    "KeyDestroyedError",
    "KeyProviderError",
    "KeyProviderUnavailable",
    "MicrosoftGraphConfig",
    "MicrosoftGraphCredentials",
    "NotFoundError",
    "OAuthProviderError",
    "OAuthProviderUnavailable",
    "OAuthToken",
    "OpenedConfig",
    "ProviderConfig",
    "ProviderConfigModel",
    "ProviderType",
    "ReconsentRequired",
    "RefreshedToken",
    "RotationError",
    "SchemaNotMigrated",
    "SendGridConfig",
    "SendGridCredentials",
    "SmtpConfig",
    "SmtpCredentials",
    "TenantKeyUnavailable",
    "TenantNotSetError",
    "TenantVaultError",
    "TokenEvent",
    "Vault",
    "async_load_credentials",
    "async_store_credentials",
    "default_async_vault",
    "default_vault",
    "load_credentials",
    "store_credentials",
]
