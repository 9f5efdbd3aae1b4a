"""The asyncio bridge: the sync core runs on the event loop, its I/O awaited.

``AsyncVault`` runs the very code ``Vault`` runs, inside a greenlet that
SQLAlchemy's asyncio layer provides (:func:`run_in_greenlet`, what
``AsyncSession.run_sync`` uses). There every database call of the core goes
through psycopg's ``AsyncConnection`` and, where it would wait, suspends the
task instead of blocking the loop. Anything else that would block — the key
provider's HTTP calls, waiting for another task's key load — goes through
:func:`off_loop` or :func:`wait_for`, which await from inside the greenlet.

Only these three functions know of greenlets; they are the one place that
would change if SQLAlchemy renamed its bridge.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future
from typing import ParamSpec, TypeVar

from sqlalchemy.util import await_only, greenlet_spawn

P = ParamSpec("P")
T = TypeVar("T")


async def run_in_greenlet(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run the sync ``function`` on the loop, its database I/O awaited (not blocking)."""
    return await greenlet_spawn(functools.partial(function, *args, **kwargs))


def off_loop(
    executor: Executor | None, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """``function`` run in ``executor``'s threads while the calling task is suspended.

    Call it only inside :func:`run_in_greenlet` (else ``MissingGreenlet``). For a
    blocking call the core makes, e.g. the key provider's HTTP to transit."""
    loop = asyncio.get_running_loop()
    return await_only(loop.run_in_executor(executor, functools.partial(function, *args, **kwargs)))


def wait_for(awaited: Future[T] | Awaitable[T]) -> T:
    """The result of a thread-safe future or an awaitable, the calling task suspended
    meanwhile.

    Call it only inside :func:`run_in_greenlet`: it is how a task waits for a key
    load another task (or thread) leads, without blocking the loop that load needs,
    and how the core awaits an application's coroutine (an async token refresher)."""
    if isinstance(awaited, Future):
        return await_only(asyncio.wrap_future(awaited))
    return await_only(awaited)
