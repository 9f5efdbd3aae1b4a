"""AsyncVault with Vault's sync face, so one facade test suite runs against both.

A test calls ``vault.create_config(...)`` either way. For AsyncVault the call
becomes the coroutine ``AsyncVault.create_config(...)``, run on an event loop
living in its own thread; the test's thread waits for its result, or gets its
exception as raised. Nothing is mocked or translated: arguments, results and
errors pass through unchanged. Tests that call from several threads put several
coroutines on that one loop at once: real concurrency of tasks.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from tenantvault import AsyncVault
from tenantvault.db.session import create_engine
from tenantvault.keys.offloop import OffLoopKeyProvider
from tenantvault.settings import Settings

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread; :meth:`run` waits for a coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, awaitable: Awaitable[T], timeout: float = 120) -> T:
        async def awaited() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(awaited(), self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class SyncLookingAsyncVault:
    """Vault's methods, each running AsyncVault's coroutine of the same name.

    ``engine`` is a sync engine on the same database, for the tests' own SQL (the
    vault's is an ``AsyncEngine``); ``keyring`` is the AsyncVault's own.
    """

    def __init__(self, async_vault: AsyncVault, loop: LoopThread, engine: sa.Engine) -> None:
        self.async_vault = async_vault
        self.loop = loop
        self.keyring = async_vault.keyring
        self.engine = engine

    def __repr__(self) -> str:
        return f"SyncLooking({self.async_vault!r})"

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.async_vault, name)
        if not inspect.iscoroutinefunction(method):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            joined = kwargs.get("session")
            if isinstance(joined, Session):
                raise TypeError("AsyncVault joins an AsyncSession: use caller_transaction")
            if isinstance(joined, SyncLookingAsyncSession):
                kwargs["session"] = joined.session
            return self.loop.run(method(*args, **kwargs))

        return call


class SyncLookingAsyncSession:
    """A caller's ``AsyncSession`` in a transaction, with the sync ``rollback``."""

    def __init__(self, session: AsyncSession, loop: LoopThread) -> None:
        self.session = session
        self.loop = loop

    def rollback(self) -> None:
        self.loop.run(self.session.rollback())


@contextmanager
def caller_transaction(vault: Any) -> Iterator[Any]:
    """The application's own session and transaction, for ``session=``: a ``Session``
    for a Vault, an ``AsyncSession`` for an AsyncVault. Commits when the block ends
    (unless rolled back inside), rolls back when it raises."""
    if not isinstance(vault, SyncLookingAsyncVault):
        with Session(vault.engine) as session, session.begin():
            yield session
        return
    loop = vault.loop
    session = AsyncSession(vault.async_vault.engine)
    try:
        loop.run(session.begin())
        yield SyncLookingAsyncSession(session, loop)
        if session.in_transaction():
            loop.run(session.commit())
    finally:
        loop.run(session.close())  # rolls back what is still open


@contextmanager
def sync_looking_async_vault(
    settings: Settings, key_provider: Any, **options: Any
) -> Iterator[SyncLookingAsyncVault]:
    """An AsyncVault from ``settings`` behind Vault's sync face; disposed afterwards."""
    loop = LoopThread()
    async_vault = AsyncVault.from_settings(settings, key_provider=key_provider)
    if options:  # e.g. history_credentials_kept: the same constructor arguments as Vault's
        async_vault = AsyncVault(async_vault.engine, async_vault.keyring, **options)
    engine = create_engine(settings)
    try:
        yield SyncLookingAsyncVault(async_vault, loop, engine)
    finally:
        loop.run(async_vault.dispose())
        loop.close()
        engine.dispose()


def sync_provider(vault: Any) -> Any:
    """The sync key provider behind either facade (an AsyncVault's runs off the loop)."""
    provider = vault.keyring.provider
    return provider.inner if isinstance(provider, OffLoopKeyProvider) else provider
