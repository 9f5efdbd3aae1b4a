"""What every service of a facade shares (``VaultCore``: the engine, the keyring, the
tenant scope, row lookups, sealing by place, audit events; it never hands out a key),
and what both facades build from settings.

Every call runs in one transaction scoped to the tenant by row-level security.
Pass ``session=`` to join the caller's SQLAlchemy session and transaction (the
tenant setting is then made on it, for the rest of that transaction); otherwise
each call opens and commits its own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from functools import partial
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from tenantvault import audit
from tenantvault.db import queries
from tenantvault.db.held import HeldConnections
from tenantvault.db.models import AuditAction, EmailProviderConfig, ProviderType
from tenantvault.db.session import fetch_one_in, held_connections, set_tenant, tenant_session
from tenantvault.db.standbys import StandbyReads, StandbyRouting
from tenantvault.errors import DecryptionError, KeyDestroyedError, NotFoundError
from tenantvault.keys.backoff import ProviderBackoff
from tenantvault.keys.cache import DataKeyCache, Wait
from tenantvault.keys.keyring import Keyring, Sealer
from tenantvault.keys.sealed import CONFIG_CREDENTIALS
from tenantvault.kms.factory import kek_resolver, key_provider_from_settings
from tenantvault.kms.keks import Keks
from tenantvault.kms.metered import MeteredKeyProvider
from tenantvault.kms.provider import KeyProvider
from tenantvault.metrics import Metrics, default_metrics
from tenantvault.settings import Settings
from tenantvault.vault.providers import CredentialsModel, credentials_from_storage
from tenantvault.vault.tokenevents import TokenEvents
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
    wrap: Callable[[KeyProvider], KeyProvider] | None = None,
) -> Keyring:
    """The keyring both facades build from settings: ``provider`` behind a cache
    within the configured bounds (``wait``: how a cache miss waits for another
    caller's load of the same key; ``metrics``: where it counts hits, misses and
    evictions) and the configured backoff after a failed unwrap. Tenants' own KEKs
    come from the settings' KMS clients, each wrapped by ``wrap`` (metered by default,
    as ``provider`` is)."""
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
    if wrap is None:
        measured = metrics or default_metrics()
        wrap = partial(MeteredKeyProvider, metrics=measured)
    keks = Keks(provider, kek_resolver(settings, wrap))
    return Keyring(
        provider, cache, allow_legacy=settings.open_legacy_format, backoff=backoff, keks=keks
    )


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


def _called(call: Callable[[], Any]) -> Any:
    return call()


CallerSession = TypeVar("CallerSession")
"""The session a facade's callers join with ``session=``: ``Session`` for ``Vault``,
``AsyncSession`` for ``AsyncVault``. The services take it as given; the core joins
it (:meth:`VaultCore.scope`)."""


def same_session(session: Session) -> Session:
    """How ``Vault``'s core joins a caller's session: as it is."""
    return session


_COUNTS_COMMITS = "tenantvault.counts_commits"
"""The ``Session.info`` key of a caller's session whose commits a core counts."""


class VaultCore(Generic[CallerSession]):
    """What every service of a facade holds: the engine, the keyring, the tenant scope,
    the lookups, sealing by place and audit events. It never hands out a key."""

    def __init__(
        self,
        engine: sa.Engine,
        keyring: Keyring,
        *,
        join: Callable[[CallerSession], Session],
        history_credentials_kept: int = 10,
        audit_loads: bool = False,
        hot_path_connections: int = 6,
        metrics: Metrics | None = None,
        standbys: Sequence[sa.Engine] = (),
        read_max_lag_ms: int = 1000,
        routing: StandbyRouting | None = None,
        token_events: TokenEvents | None = None,
        blocking: Callable[[Callable[[], Any]], Any] = _called,
    ) -> None:
        """A core on ``engine`` (from :func:`tenantvault.db.create_engine`) and ``keyring``.

        ``join``: the caller's session as the core works in it (the same ``Session``
        for ``Vault``; an ``AsyncSession``'s sync session for ``AsyncVault``).

        ``hot_path_connections``: the load hot path holds up to this many connections of
        its own, opened by ``engine`` and detached from its pool (0: none; loads then
        take the full path). Close them with :meth:`dispose`.

        ``metrics``: where loads and stores are timed (the global meter provider's
        instruments when None).

        ``standbys``: engines on hot standbys of ``engine``'s database (from
        :func:`tenantvault.db.create_engine` with their ``url``): the hot path's
        statement and ``warm``'s reads go to one while it is current enough
        (:mod:`tenantvault.db.standbys`; ``read_max_lag_ms``), everything else to
        ``engine``. ``routing``: the standbys' state when a facade reads them itself
        (``AsyncVault``); the core then counts its commits there.
        ``token_events``: where OAuth grant events go (counted only, when None).
        ``blocking``: how a blocking call (an OAuth request) runs: in the caller's
        thread for ``Vault``; ``AsyncVault``'s in a worker thread, the task suspended.
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
        self.token_events = token_events or TokenEvents(self.metrics)
        self.blocking = blocking
        self._join = join
        self.load_sql = queries.hot_load_sql(schema_of(engine))
        self.token_sql = queries.hot_token_sql(schema_of(engine))
        self.open_sql = queries.hot_open_sql(schema_of(engine))
        self.routing = routing
        self.held: HeldConnections | StandbyReads | None = None
        if hot_path_connections and not audit_loads:
            self.held = held_connections(engine, size=hot_path_connections)
            if standbys:
                # The one place the hot path's connections are chosen.
                self.routing = StandbyRouting(len(standbys), max_lag_ms=read_max_lag_ms)
                held = [held_connections(e, size=hot_path_connections) for e in standbys]
                self.held = StandbyReads(self.held, held, self.routing, standbys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(engine={self.engine!r}, keyring={self.keyring!r})"

    def dispose(self) -> None:
        """Close the hot path's held connections and the engine's pooled ones (at
        shutdown; a later call opens new ones)."""
        if self.held is not None:
            self.held.close()
        self.engine.dispose()

    @contextmanager
    def scope(self, tenant_id: str, session: CallerSession | None) -> Iterator[Session]:
        """A transaction scoped to ``tenant_id``: the caller's (``session``, joined; the
        tenant setting stays for the rest of it), or one of its own, committed at the end."""
        # Both branches check tenant_id before touching the database.
        if session is None:
            with tenant_session(self.engine, tenant_id) as own:
                yield own
            if self.routing is not None:
                self.routing.committed()  # loads read the primary until a standby has it
            return
        joined = self._join(session)
        set_tenant(joined.connection(), tenant_id)
        routing = self.routing
        if routing is not None and not joined.info.get(_COUNTS_COMMITS):
            # The caller commits: each of its commits from now on is counted.
            joined.info[_COUNTS_COMMITS] = True
            event.listen(joined, "after_commit", lambda _session: routing.committed())
        yield joined

    def read_transaction(self) -> contextlib.AbstractContextManager[sa.Connection]:
        """A transaction for reads that may come from a standby (``warm``'s)."""
        if isinstance(self.held, StandbyReads):
            return self.held.read_transaction(self.engine)
        return self.engine.begin()

    def one_statement(
        self, statement: str, params: tuple[str, str], session: CallerSession | None
    ) -> tuple[bool, Any]:
        """A hot path's one statement (a function of 0009/0011 that scopes the tenant
        itself): (True, its first row), or (False, None) when this vault holds no
        connections for it. Joined to ``session``, it runs in the caller's transaction,
        which stays scoped to the tenant, as any call joined to a session leaves it; on
        its own, in autocommit on a held connection, and the setting ends with it."""
        if session is not None:
            return True, fetch_one_in(self._join(session), statement, params)
        if self.held is not None:
            return True, self.held.fetch_one(statement, params)
        return False, None

    def sealer(self, session: Session, tenant_id: str) -> Sealer:
        """The keyring's sealer for ``tenant_id`` in ``session``'s transaction."""
        return self.keyring.sealer(session.connection(), tenant_id)

    @staticmethod
    def one(session: Session, statement: Any, what: str) -> EmailProviderConfig:
        """The one config row ``statement`` selects.

        Raises:
            NotFoundError: none (the message is ``what``).
        """
        row = session.scalars(statement).one_or_none()
        if row is None:
            raise NotFoundError(what)
        assert isinstance(row, EmailProviderConfig)
        return row

    def live(
        self, session: Session, tenant_id: str, config_id: str, *, lock: bool = True
    ) -> EmailProviderConfig:
        """A live config's row, locked for update unless ``lock`` is False.

        Raises:
            NotFoundError: no such live config.
        """
        statement = queries.config_by_id(tenant_id, config_id)
        return self.one(
            session,
            statement.with_for_update() if lock else statement,
            f"no live config {config_id} for tenant {tenant_id}",
        )

    def open_credentials(
        self, session: Session, row: EmailProviderConfig, sealer: Sealer | None = None
    ) -> CredentialsModel:
        """The row's credentials, opened beside its config and version.

        Raises:
            NotFoundError: the row holds none.
            DecryptionError: they do not open here (a warning names the config).
        """
        if row.encrypted_credentials is None:
            raise NotFoundError(f"config {row.id} of tenant {row.tenant_id} has no credentials")
        context = CONFIG_CREDENTIALS.place(
            row.tenant_id, row.id, bound=(row.type, row.version), config=row.config
        )
        sealer = sealer or self.sealer(session, row.tenant_id)
        try:
            opened = sealer.open(row.encrypted_credentials, context)
        except DecryptionError:
            log_unopenable(row.tenant_id, row.id, row.version)
            raise
        # Checked against the config whenever either was written (create, update),
        # so loads, cached or not, rebuild only the credentials model.
        return credentials_from_storage(ProviderType(row.type), opened)

    def check_binding(self, session: Session, row: EmailProviderConfig) -> None:
        """Open the row's credentials, so their binding to its config and version is
        checked; a tenant whose keys were shredded has nothing left to check.

        Raises:
            DecryptionError: they do not open beside the row's config and version.
        """
        with contextlib.suppress(KeyDestroyedError):
            self.open_credentials(session, row)

    def view(
        self, session: Session, row: EmailProviderConfig, with_credentials: bool
    ) -> ProviderConfig:
        """What the caller gets for ``row`` (its credentials opened if asked and held)."""
        credentials = None
        if with_credentials and row.encrypted_credentials is not None:
            credentials = self.open_credentials(session, row)
        return config_view(row, credentials)

    @staticmethod
    def audit_config(
        session: Session,
        row: EmailProviderConfig,
        action: AuditAction,
        actor: str | None,
        **details: str | int | bool | list[str] | None,
    ) -> None:
        """An audit event about ``row``, in ``session``'s transaction."""
        audit.record(
            session.connection(),
            row.tenant_id,
            action,
            actor=actor,
            target_type="config",
            target_id=row.id,
            details=details,
        )
