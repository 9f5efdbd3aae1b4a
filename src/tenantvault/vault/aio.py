"""``AsyncVault``: the ``Vault`` contract for asyncio applications, as a thin driver.

It holds no rule of its own. Each method runs the same service method as ``Vault``
(the shared core: validation, sealing, statements, error mapping, audit events),
made from the one declared list (:mod:`tenantvault.vault.methods`),
inside SQLAlchemy's asyncio greenlet (:mod:`tenantvault.db.bridge`), on an engine
of psycopg's ``AsyncConnection``: the core's database I/O suspends the task
instead of blocking the loop. The key provider runs in worker threads
(:class:`~tenantvault.keys.offloop.OffLoopKeyProvider`), and a cache miss waits
for another task's load of the same key by suspending (single flight per tenant
and key version). ``tests/test_layers.py`` keeps this module free of SQL, of
validation and of any call into the core's private parts.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import ParamSpec, Self, TypeVar

from opentelemetry.metrics import MeterProvider
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from tenantvault.db.bridge import off_loop, run_in_greenlet, wait_for
from tenantvault.db.held import AsyncHeldConnections
from tenantvault.db.session import async_held_connections, create_async_engine
from tenantvault.db.standbys import AsyncStandbyReads, StandbyRouting
from tenantvault.keys.keyring import Keyring
from tenantvault.keys.offloop import OffLoopKeyProvider
from tenantvault.kms.metered import MeteredKeyProvider
from tenantvault.kms.provider import KeyProvider
from tenantvault.metrics import Metrics, default_metrics, metrics_on
from tenantvault.settings import Settings, load_settings
from tenantvault.vault.core import VaultCore, keyring_from_settings, metered_provider
from tenantvault.vault.credentials import (
    finish_hot_load,
    hot_load_parameters,
)
from tenantvault.vault.opening import OpenedConfig, finish_hot_open
from tenantvault.vault.providers import CredentialsModel
from tenantvault.vault.services import Services, VaultMethods
from tenantvault.vault.tokenevents import TokenEventHook, TokenEvents
from tenantvault.vault.tokens import (
    OAuthToken,
    RefreshedToken,
    finish_hot_token,
)

P = ParamSpec("P")
T = TypeVar("T")
Refresher = Callable[[OAuthToken], RefreshedToken | Awaitable[RefreshedToken]]
"""A token refresher: a coroutine function (awaited on the loop) or a plain function
(run in a worker thread, so its HTTP call does not block the loop)."""


def _sync_face(session: AsyncSession) -> Session:
    # The AsyncSession's own sync session: what AsyncSession.run_sync hands its callable.
    # The core joins its transaction exactly as it joins a sync caller's.
    return session.sync_session


def _in_the_core(refresher: Refresher) -> Callable[[OAuthToken], RefreshedToken]:
    """``refresher`` as the core calls it (synchronously, inside the greenlet)."""

    def call(current: OAuthToken) -> RefreshedToken:
        answered: RefreshedToken | Awaitable[RefreshedToken]
        if inspect.iscoroutinefunction(refresher):
            answered = refresher(current)
        else:
            answered = off_loop(None, refresher, current)
        if isinstance(answered, Awaitable):  # also a plain function returning a coroutine
            awaited: RefreshedToken = wait_for(answered)
            return awaited
        # Anything else goes to the core as returned: it refuses what is not a RefreshedToken.
        return answered

    return call


class AsyncVault(VaultMethods[AsyncSession]):
    """Store and load tenants' email-provider configs, credentials and OAuth tokens
    from asyncio code: every method of :class:`tenantvault.Vault`, as a coroutine
    with the same arguments, errors and results.

    Build it with :meth:`from_settings` inside the event loop that will use it (its
    connections belong to that loop), and ``await vault.dispose()`` at shutdown.
    ``session=`` joins the caller's :class:`~sqlalchemy.ext.asyncio.AsyncSession`
    and its transaction; otherwise each call runs in its own transaction.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        keyring: Keyring,
        *,
        history_credentials_kept: int = 10,
        audit_loads: bool = False,
        max_concurrent: int = 3,
        held: AsyncHeldConnections | AsyncStandbyReads | None = None,
        metrics: Metrics | None = None,
        on_token_event: TokenEventHook | None = None,
    ) -> None:
        """A vault on ``engine`` (from :func:`tenantvault.db.session.create_async_engine`)
        and ``keyring``, whose provider must be an ``OffLoopKeyProvider``.

        ``max_concurrent`` calls run in their own transaction at once; the others wait
        their turn, parked, costing the loop nothing. Without it a burst of a thousand
        calls would all start at once, each running its first steps on the loop before
        queueing in the pool: turns of the loop of tens of milliseconds. A turn runs at
        most that many calls' steps (3: under 20 ms at once on a slow, busy 2-core
        machine, measured by tests/vault/test_async.py; 6 made turns of up to 25 ms
        there, and a second core's worth of transactions per loop gains nothing).
        Calls that join the caller's session are never held back (it already holds
        its connection, which a turn could be waiting for).

        ``held``: connections for the load hot path (without ``session=`` and load
        auditing): its one statement, awaited straight on psycopg, its row opened by
        the core's own functions. Without them the hot path runs in the core, through
        the engine's pool and the greenlet, which costs about as much again. With
        standbys (:class:`~tenantvault.db.standbys.AsyncStandbyReads`) that statement
        reads one while it is current enough; the core counts its commits there.

        ``on_token_event``: called when a user's OAuth grant fails for good or recovers
        (:class:`~tenantvault.vault.tokenevents.TokenEvent`); a coroutine function is
        awaited on the loop, a plain function called in the greenlet.

        Raises:
            ValueError: the provider would block the loop, or a bound is out of range.
        """
        if not isinstance(keyring.provider, OffLoopKeyProvider):
            raise ValueError("an AsyncVault's key provider must be an OffLoopKeyProvider")
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.engine = engine
        self.keyring = keyring
        self._admission = asyncio.Semaphore(max_concurrent)
        self._held = None if audit_loads else held
        # The shared core, on the async engine's sync face: usable only inside the
        # bridge's greenlet, which every method provides.
        self._core = VaultCore(
            engine.sync_engine,
            keyring,
            join=_sync_face,
            history_credentials_kept=history_credentials_kept,
            audit_loads=audit_loads,
            # The loop's hot path is this facade's own (``held``); the core's would
            # block the loop on a thread's wait for a connection.
            hot_path_connections=0,
            metrics=metrics,
            routing=self._held.routing if isinstance(self._held, AsyncStandbyReads) else None,
            token_events=TokenEvents(metrics or default_metrics(), on_token_event, wait=wait_for),
            # An OAuth request runs in a worker thread, the task suspended.
            blocking=lambda call: off_loop(None, call),
        )
        self._services = Services(self._core)

    def __repr__(self) -> str:
        return f"AsyncVault(engine={self.engine!r}, keyring={self.keyring!r})"

    @classmethod
    def from_settings(
        cls,
        settings: Settings | None = None,
        *,
        key_provider: KeyProvider | None = None,
        meter_provider: MeterProvider | None = None,
        on_token_event: TokenEventHook | None = None,
    ) -> Self:
        """A vault from ``TENANTVAULT_*`` / ``VAULT_*`` settings, as ``Vault.from_settings``.

        ``key_provider`` is the sync provider (as ``Vault`` takes); its calls run in
        worker threads. ``meter_provider`` as ``Vault.from_settings`` takes it."""
        settings = settings or load_settings()
        metrics = metrics_on(meter_provider)
        # Metered inside the worker threads: a call's duration is Vault's, not the queue's.
        provider = OffLoopKeyProvider(metered_provider(settings, key_provider, metrics))
        primary = async_held_connections(settings)
        held: AsyncHeldConnections | AsyncStandbyReads = primary
        if settings.read_urls:
            # The one place the loop's hot path connections are chosen.
            routing = StandbyRouting(len(settings.read_urls), max_lag_ms=settings.read_max_lag_ms)
            standbys = [async_held_connections(settings, url=url) for url in settings.read_urls]
            held = AsyncStandbyReads(primary, standbys, routing)
        return cls(
            create_async_engine(settings),
            keyring_from_settings(
                settings,
                provider,
                wait=wait_for,
                metrics=metrics,
                wrap=lambda kek: provider.sharing(MeteredKeyProvider(kek, metrics)),
            ),
            history_credentials_kept=settings.config_history_credentials_kept,
            audit_loads=settings.audit_loads,
            held=held,
            metrics=metrics,
            on_token_event=on_token_event,
        )

    async def _run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``function`` of the core in the bridge's greenlet, taking a turn unless it
        joins the caller's session."""
        if kwargs.get("session") is not None:
            return await run_in_greenlet(function, *args, **kwargs)
        async with self._admission:
            return await run_in_greenlet(function, *args, **kwargs)

    async def dispose(self) -> None:
        """Close the pooled connections and let the key provider's threads end."""
        await self.engine.dispose()
        if self._held is not None:
            await self._held.close()
        provider = self.keyring.provider
        assert isinstance(provider, OffLoopKeyProvider)
        provider.close()

    async def refresh_oauth_token(
        self,
        tenant_id: str,
        config_id: str,
        refresher: Refresher | None = None,
        *,
        min_validity: timedelta = timedelta(minutes=5),
        now: datetime | None = None,
        actor: str | None = None,
    ) -> OAuthToken:
        """:meth:`Vault.refresh_oauth_token <tenantvault.Vault.refresh_oauth_token>`,
        awaited. ``refresher`` may be a coroutine function (awaited on the loop) or a
        plain function (run in a worker thread); either runs at most once per expiry
        across tasks, threads and processes. Without one tenantvault refreshes (its
        HTTP request in a worker thread)."""
        return await self._run(
            self._services.tokens.refresh_oauth_token,
            tenant_id,
            config_id,
            None if refresher is None else _in_the_core(refresher),
            min_validity=min_validity,
            now=now,
            actor=actor,
        )

    async def load_credentials(
        self,
        tenant_id: str,
        config_id: str,
        *,
        actor: str | None = None,
        session: AsyncSession | None = None,
    ) -> CredentialsModel:
        """``Vault.load_credentials``, awaited. Its hot path (no ``session=``, the key
        cached) is one statement on a held connection, its row opened by the core's own
        functions (:func:`tenantvault.vault.credentials.finish_hot_load`)."""
        if session is None and self._held is not None:
            started = time.perf_counter()
            row = await self._held.fetch_one(
                self._core.load_sql, hot_load_parameters(tenant_id, config_id)
            )
            loaded = finish_hot_load(self.keyring, tenant_id, config_id, row)
            if loaded is not None:
                self._core.metrics.loaded(started)
                return loaded
        return await self._run(
            self._services.credentials.load_credentials,
            tenant_id,
            config_id,
            actor=actor,
            session=session,
        )

    async def open_config(
        self,
        tenant_id: str,
        config_id: str,
        *,
        session: AsyncSession | None = None,
    ) -> OpenedConfig:
        """``Vault.open_config``, awaited: a config and its secrets verified together.
        Its hot path is one statement on a held connection, as :meth:`load_credentials`'s."""
        if session is None and self._held is not None:
            started = time.perf_counter()
            row = await self._held.fetch_one(
                self._core.open_sql, hot_load_parameters(tenant_id, config_id)
            )
            opened = finish_hot_open(self.keyring, tenant_id, config_id, row)
            if opened is not None:
                self._core.metrics.loaded(started)
                return opened
        return await self._run(
            self._services.opening.open_config, tenant_id, config_id, session=session
        )

    async def load_oauth_token(
        self,
        tenant_id: str,
        config_id: str,
        *,
        session: AsyncSession | None = None,
    ) -> OAuthToken:
        """``Vault.load_oauth_token``, awaited; its hot path is one statement on a held
        connection, as :meth:`load_credentials`'s."""
        if session is None and self._held is not None:
            row = await self._held.fetch_one(
                self._core.token_sql, hot_load_parameters(tenant_id, config_id)
            )
            loaded = finish_hot_token(self.keyring, tenant_id, config_id, row)
            if loaded is not None:
                return loaded
        return await self._run(
            self._services.tokens.load_oauth_token,
            tenant_id,
            config_id,
            session=session,
        )
