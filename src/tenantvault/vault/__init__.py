"""The application's door: the ``Vault`` facade (and ``AsyncVault``, the same for
asyncio), its provider models and templates."""

from tenantvault.keys.warmup import WarmReport
from tenantvault.vault.aio import AsyncVault
from tenantvault.vault.consent import AuthorizationRequest
from tenantvault.vault.facade import Vault
from tenantvault.vault.opening import OpenedConfig
from tenantvault.vault.tokenevents import TokenEvent
from tenantvault.vault.tokens import ExpiringToken, OAuthToken, RefreshedToken
from tenantvault.vault.usage import Usage, UsageDay
from tenantvault.vault.views import ConfigVersion, ProviderConfig

__all__ = [
    "AsyncVault",
    "AuthorizationRequest",
    "ConfigVersion",
    "ExpiringToken",
    "OAuthToken",
    "OpenedConfig",
    "ProviderConfig",
    "RefreshedToken",
    "TokenEvent",
    "Usage",
    "UsageDay",
    "Vault",
    "WarmReport",
]
