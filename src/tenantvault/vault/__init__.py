"""The application's door: the ``Vault`` facade, its provider models and templates."""

from tenantvault.vault.core import (
    ConfigVersion,
    ExpiringToken,
    OAuthToken,
    ProviderConfig,
    RefreshedToken,
    Usage,
    UsageDay,
    Vault,
)

__all__ = [
    "ConfigVersion",
    "ExpiringToken",
    "OAuthToken",
    "ProviderConfig",
    "RefreshedToken",
    "Usage",
    "UsageDay",
    "Vault",
]
