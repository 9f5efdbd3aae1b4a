"""A facade's services, each holding the facade's one core, and the methods it runs
on them: every service's declared list, joined."""

from __future__ import annotations

from functools import partial
from typing import Any, Generic, TypeVar

from tenantvault.vault.configs import ConfigMethods, ConfigService
from tenantvault.vault.consent import OAuthMethods, OAuthService, managed_refresher
from tenantvault.vault.core import CallerSession, VaultCore
from tenantvault.vault.credentials import CredentialMethods, CredentialService
from tenantvault.vault.history import HistoryMethods, HistoryService
from tenantvault.vault.opening import OpeningMethods, OpeningService
from tenantvault.vault.tokens import TokenMethods, TokenService
from tenantvault.vault.usage import UsageMethods, UsageService
from tenantvault.vault.warmup import WarmupMethods, WarmupService

Service = TypeVar("Service")


class Services(Generic[CallerSession]):
    """Configs, credentials, history, consent, opening, tokens, usage and warm-up, on
    ``core``."""

    def __init__(self, core: VaultCore[CallerSession]) -> None:
        self.configs = ConfigService(core)
        self.credentials = CredentialService(core, self.configs)
        self.history = HistoryService(core)
        self.opening = OpeningService(core)
        self.oauth = OAuthService(core)
        self.tokens = TokenService(core, partial(managed_refresher, core))
        self.usage = UsageService(core)
        self.warmup = WarmupService(core)
        # Every attribute above is a service: a declared method finds its own by type.
        self._by_type: dict[type[Any], Any] = {type(s): s for s in vars(self).values()}

    def of(self, service: type[Service]) -> Service:
        """The instance of ``service`` (how a declared facade method finds its own)."""
        found: Service = self._by_type[service]
        return found


class VaultMethods(
    ConfigMethods[CallerSession],
    CredentialMethods[CallerSession],
    HistoryMethods[CallerSession],
    OAuthMethods[CallerSession],
    OpeningMethods[CallerSession],
    TokenMethods[CallerSession],
    UsageMethods[CallerSession],
    WarmupMethods[CallerSession],
):
    """Every method of ``Vault`` (``VaultMethods[Session]``) and ``AsyncVault``
    (``VaultMethods[AsyncSession]``): each service's declared list."""
