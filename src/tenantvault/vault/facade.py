"""The ``Vault`` facade: what application code calls. It never hands out a key."""

from __future__ import annotations

from tenantvault.vault.credentials import Credentials
from tenantvault.vault.history import History
from tenantvault.vault.opening import Opening
from tenantvault.vault.tokens import OAuthTokens
from tenantvault.vault.usage import UsageStatistics
from tenantvault.vault.warmup import Warmup


class Vault(Opening, Credentials, History, OAuthTokens, UsageStatistics, Warmup):
    """Store and load tenants' email-provider configs, credentials and OAuth tokens.

    Build it with :meth:`from_settings`. Every method runs in one transaction scoped
    to the tenant by row-level security, or joins the caller's with ``session=``.
    The parts: a config opened with its secrets, verified together
    (:class:`~tenantvault.vault.opening.Opening`), configs and their lifecycle
    (:class:`~tenantvault.vault.configs.Configs`),
    credentials and the one-round-trip load (:class:`~tenantvault.vault.credentials.Credentials`),
    kept versions and rollback (:class:`~tenantvault.vault.history.History`), OAuth
    tokens (:class:`~tenantvault.vault.tokens.OAuthTokens`), usage counters
    (:class:`~tenantvault.vault.usage.UsageStatistics`), fleet warm-up of the key cache
    (:class:`~tenantvault.vault.warmup.Warmup`), on a shared
    :class:`~tenantvault.vault.core.VaultCore`.
    """
