"""The ``Vault`` facade: what application code calls. It never hands out a key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import sqlalchemy as sa
from opentelemetry.metrics import MeterProvider
from sqlalchemy.orm import Session

from tenantvault.db.session import create_engine
from tenantvault.keys.keyring import Keyring
from tenantvault.kms.provider import KeyProvider
from tenantvault.metrics import Metrics, default_metrics, metrics_on
from tenantvault.settings import Settings, load_settings
from tenantvault.vault.core import VaultCore, keyring_from_settings, metered_provider, same_session
from tenantvault.vault.services import Services, VaultMethods
from tenantvault.vault.tokenevents import TokenEventHook, TokenEvents


class Vault(VaultMethods[Session]):
    """Store and load tenants' email-provider configs, credentials and OAuth tokens.

    Build it with :meth:`from_settings`. Every method runs in one transaction scoped
    to the tenant by row-level security, or joins the caller's with ``session=``.
    Each method runs the method of the same name of one service
    (:class:`~tenantvault.vault.methods.VaultMethods` lists them): a config opened
    with its secrets, verified together (:mod:`~tenantvault.vault.opening`), configs
    and their lifecycle (:mod:`~tenantvault.vault.configs`), credentials and the
    one-round-trip load (:mod:`~tenantvault.vault.credentials`), kept versions and
    rollback (:mod:`~tenantvault.vault.history`), OAuth tokens
    (:mod:`~tenantvault.vault.tokens`), usage counters (:mod:`~tenantvault.vault.usage`),
    fleet warm-up of the key cache (:mod:`~tenantvault.vault.warmup`), all on one
    :class:`~tenantvault.vault.core.VaultCore`.
    """

    def __init__(
        self,
        engine: sa.Engine,
        keyring: Keyring,
        *,
        history_credentials_kept: int = 10,
        audit_loads: bool = False,
        hot_path_connections: int = 6,
        metrics: Metrics | None = None,
        standbys: Sequence[sa.Engine] = (),
        read_max_lag_ms: int = 1000,
        on_token_event: TokenEventHook | None = None,
    ) -> None:
        """A vault on ``engine`` (from :func:`tenantvault.db.create_engine`) and ``keyring``.

        ``hot_path_connections``: the load hot path holds up to this many connections of
        its own, opened by ``engine`` and detached from its pool (0: none; loads then
        take the full path). Close them with :meth:`dispose`.

        ``metrics``: where loads and stores are timed (the global meter provider's
        instruments when None).

        ``standbys``: engines on hot standbys the load hot path and ``warm`` read from
        while one is current enough (``read_max_lag_ms``; :mod:`tenantvault.db.standbys`).
        ``on_token_event``: called when a user's OAuth grant fails for good or recovers
        (:class:`~tenantvault.vault.tokenevents.TokenEvent`), after the change commits.
        """
        self._core = VaultCore(
            engine,
            keyring,
            join=same_session,
            history_credentials_kept=history_credentials_kept,
            audit_loads=audit_loads,
            hot_path_connections=hot_path_connections,
            metrics=metrics,
            standbys=standbys,
            read_max_lag_ms=read_max_lag_ms,
            token_events=TokenEvents(metrics or default_metrics(), on_token_event),
        )
        self._services = Services(self._core)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(engine={self.engine!r}, keyring={self.keyring!r})"

    @classmethod
    def from_settings(
        cls,
        settings: Settings | None = None,
        *,
        key_provider: KeyProvider | None = None,
        meter_provider: MeterProvider | None = None,
        on_token_event: TokenEventHook | None = None,
    ) -> Self:
        """A vault from ``TENANTVAULT_*`` / ``VAULT_*`` settings.

        ``meter_provider``: the OpenTelemetry meter provider its metrics go to (the
        global one when None, also when the application sets it later).
        ``on_token_event``: the application's hook for OAuth grants that fail for good
        (re-consent needed) or recover (:class:`~tenantvault.vault.tokenevents.TokenEvent`)."""
        settings = settings or load_settings()
        metrics = metrics_on(meter_provider)
        return cls(
            create_engine(settings),
            keyring_from_settings(
                settings, metered_provider(settings, key_provider, metrics), metrics=metrics
            ),
            history_credentials_kept=settings.config_history_credentials_kept,
            audit_loads=settings.audit_loads,
            hot_path_connections=settings.hot_path_connections,
            metrics=metrics,
            standbys=[create_engine(settings, url=url) for url in settings.read_urls],
            read_max_lag_ms=settings.read_max_lag_ms,
            on_token_event=on_token_event,
        )

    def dispose(self) -> None:
        """Close the hot path's held connections and the engine's pooled ones (at
        shutdown; a later call opens new ones)."""
        self._core.dispose()

    # What the vault was built with (its core's).

    @property
    def engine(self) -> sa.Engine:
        return self._core.engine

    @property
    def keyring(self) -> Keyring:
        return self._core.keyring

    @property
    def history_credentials_kept(self) -> int:
        return self._core.history_credentials_kept

    @property
    def audit_loads(self) -> bool:
        return self._core.audit_loads

    @property
    def metrics(self) -> Metrics:
        return self._core.metrics
