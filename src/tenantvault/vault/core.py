"""What every part of the ``Vault`` facade shares: the engine, the keyring, the tenant
scope, row lookups, sealing by place, audit events. It never hands out a key.

Every call runs in one transaction scoped to the tenant by row-level security.
Pass ``session=`` to join the caller's SQLAlchemy session and transaction (the
tenant setting is then made on it, for the rest of that transaction); otherwise
each call opens and commits its own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Self

import sqlalchemy as sa
from opentelemetry.metrics import MeterProvider
from sqlalchemy.orm import Session

from tenantvault import audit
from tenantvault.db import queries
from tenantvault.db.models import AuditAction, EmailProviderConfig, ProviderType
from tenantvault.db.session import (
    create_engine,
    fetch_one_in,
    held_connections,
    set_tenant,
    tenant_session,
)
from tenantvault.errors import DecryptionError, KeyDestroyedError, NotFoundError
from tenantvault.keys.backoff import ProviderBackoff
from tenantvault.keys.cache import DataKeyCache, Wait
from tenantvault.keys.keyring import Keyring, Sealer
from tenantvault.keys.sealed import CONFIG_CREDENTIALS
from tenantvault.kms.factory import key_provider_from_settings
from tenantvault.kms.metered import MeteredKeyProvider
from tenantvault.kms.provider import KeyProvider
from tenantvault.metrics import Metrics, default_metrics, metrics_on
from tenantvault.settings import Settings, load_settings
from tenantvault.vault.providers import CredentialsModel, credentials_from_storage
from tenantvault.vault.views import ProviderConfig, config_view

log = logging.getLogger("tenantvault")


def log_unopenable(tenant_id: str, config_id: str, version: int) -> None:
    # Ids only: which config, never its content.
    log.warning(
        "credentials of config %s (version %s) of tenant %s do not open: its config, "
        "version or sealed value was changed outside tenantvault, or the value was moved",
        config_id,
        version,
        tenant_id,
    )


def keyring_from_settings(
    settings: Settings,
    provider: KeyProvider,
    *,
    wait: Wait = Future.result,
    metrics: Metrics | None = None,
) -> Keyring:
    """The keyring both facades build from settings: ``provider`` behind a cache
    within the configured bounds (``wait``: how a cache miss waits for another
    caller's load of the same key; ``metrics``: where it counts hits, misses and
    evictions) and the configured backoff after a failed unwrap."""
    cache = DataKeyCache(
        max_age_seconds=settings.dek_cache_max_age_seconds,
        max_entries=settings.dek_cache_max_entries,
        max_uses=settings.dek_cache_max_uses,
        wait=wait,
        metrics=metrics,
    )
    backoff = ProviderBackoff(
        initial_seconds=settings.transit_backoff_initial_seconds,
        max_seconds=settings.transit_backoff_max_seconds,
    )
    return Keyring(provider, cache, allow_legacy=settings.open_legacy_format, backoff=backoff)


def metered_provider(
    settings: Settings, key_provider: KeyProvider | None, metrics: Metrics
) -> KeyProvider:
    """``key_provider`` (the one ``settings`` name when None), each call recorded on
    ``metrics``: the provider both facades build from settings."""
    return MeteredKeyProvider(key_provider or key_provider_from_settings(settings), metrics)


def schema_of(engine: sa.Engine) -> str:
    """The schema an engine from :func:`tenantvault.db.create_engine` qualifies names with.

    Raises:
        ValueError: the engine was built otherwise.
    """
    schema = (engine.get_execution_options().get("schema_translate_map") or {}).get(None)
    if not schema:
        raise ValueError("the engine must come from tenantvault.db.create_engine")
    return str(schema)


class VaultCore:
    """The shared half of :class:`tenantvault.Vault`; its parts add the public methods."""

    def __init__(
        self,
        engine: sa.Engine,
        keyring: Keyring,
        *,
        history_credentials_kept: int = 10,
        audit_loads: bool = False,
        hot_path_connections: int = 6,
        metrics: Metrics | None = None,
    ) -> None:
        """A vault on ``engine`` (from :func:`tenantvault.db.create_engine`) and ``keyring``.

        ``hot_path_connections``: the load hot path holds up to this many connections of
        its own, opened by ``engine`` and detached from its pool (0: none; loads then
        take the full path). Close them with :meth:`dispose`.

        ``metrics``: where loads and stores are timed (the global meter provider's
        instruments when None).
        """
        if history_credentials_kept < 1:
            raise ValueError("history_credentials_kept must be at least 1")
        if hot_path_connections < 0:
            raise ValueError("hot_path_connections must not be negative")
        self.engine = engine
        self.keyring = keyring
        self.history_credentials_kept = history_credentials_kept
        self.audit_loads = audit_loads
        self.metrics = metrics or default_metrics()
        self._load_sql = queries.hot_load_sql(schema_of(engine))
        self._token_sql = queries.hot_token_sql(schema_of(engine))
        self._open_sql = queries.hot_open_sql(schema_of(engine))
        self._held = (
            held_connections(engine, size=hot_path_connections)
            if hot_path_connections and not audit_loads
            else None
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(engine={self.engine!r}, keyring={self.keyring!r})"

    @classmethod
    def from_settings(
        cls,
        settings: Settings | None = None,
        *,
        key_provider: KeyProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> Self:
        """A vault from ``TENANTVAULT_*`` / ``VAULT_*`` settings.

        ``meter_provider``: the OpenTelemetry meter provider its metrics go to (the
        global one when None, also when the application sets it later)."""
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
        )

    def dispose(self) -> None:
        """Close the hot path's held connections and the engine's pooled ones (at
        shutdown; a later call opens new ones)."""
        if self._held is not None:
            self._held.close()
        self.engine.dispose()

    @contextmanager
    def _scope(self, tenant_id: str, session: Session | None) -> Iterator[Session]:
        # Both branches check tenant_id before touching the database.
        if session is None:
            with tenant_session(self.engine, tenant_id) as own:
                yield own
            return
        set_tenant(session.connection(), tenant_id)
        yield session

    def _one_statement(
        self, statement: str, params: tuple[str, str], session: Session | None
    ) -> tuple[bool, Any]:
        """A hot path's one statement (a function of 0009/0011 that scopes the tenant
        itself): (True, its first row), or (False, None) when this vault holds no
        connections for it. Joined to ``session``, it runs in the caller's transaction,
        which stays scoped to the tenant, as any call joined to a session leaves it; on
        its own, in autocommit on a held connection, and the setting ends with it."""
        if session is not None:
            return True, fetch_one_in(session, statement, params)
        if self._held is not None:
            return True, self._held.fetch_one(statement, params)
        return False, None

    def _sealer(self, session: Session, tenant_id: str) -> Sealer:
        return self.keyring.sealer(session.connection(), tenant_id)

    @staticmethod
    def _one(session: Session, statement: Any, what: str) -> EmailProviderConfig:
        row = session.scalars(statement).one_or_none()
        if row is None:
            raise NotFoundError(what)
        assert isinstance(row, EmailProviderConfig)
        return row

    def _live(
        self, session: Session, tenant_id: str, config_id: str, *, lock: bool = True
    ) -> EmailProviderConfig:
        statement = queries.config_by_id(tenant_id, config_id)
        return self._one(
            session,
            statement.with_for_update() if lock else statement,
            f"no live config {config_id} for tenant {tenant_id}",
        )

    def _open_credentials(
        self, session: Session, row: EmailProviderConfig, sealer: Sealer | None = None
    ) -> CredentialsModel:
        if row.encrypted_credentials is None:
            raise NotFoundError(f"config {row.id} of tenant {row.tenant_id} has no credentials")
        context = CONFIG_CREDENTIALS.place(
            row.tenant_id, row.id, bound=(row.type, row.version), config=row.config
        )
        sealer = sealer or self._sealer(session, row.tenant_id)
        try:
            opened = sealer.open(row.encrypted_credentials, context)
        except DecryptionError:
            log_unopenable(row.tenant_id, row.id, row.version)
            raise
        # Checked against the config whenever either was written (create, update),
        # so loads, cached or not, rebuild only the credentials model.
        return credentials_from_storage(ProviderType(row.type), opened)

    def _check_binding(self, session: Session, row: EmailProviderConfig) -> None:
        """Open the row's credentials, so their binding to its config and version is
        checked; a tenant whose keys were shredded has nothing left to check.

        Raises:
            DecryptionError: they do not open beside the row's config and version.
        """
        with contextlib.suppress(KeyDestroyedError):
            self._open_credentials(session, row)

    def _view(
        self, session: Session, row: EmailProviderConfig, with_credentials: bool
    ) -> ProviderConfig:
        credentials = None
        if with_credentials and row.encrypted_credentials is not None:
            credentials = self._open_credentials(session, row)
        return config_view(row, credentials)

    @staticmethod
    def _audit(
        session: Session,
        row: EmailProviderConfig,
        action: AuditAction,
        actor: str | None,
        **details: str | int | bool | list[str] | None,
    ) -> None:
        audit.record(
            session.connection(),
            row.tenant_id,
            action,
            actor=actor,
            target_type="config",
            target_id=row.id,
            details=details,
        )
