"""Connections held open for ``AsyncVault``'s load hot path.

The hot path is one statement in autocommit: the database function scopes the
tenant with ``set_config(..., true)``, which ends with that statement, so nothing
of a tenant stays on a connection. SQLAlchemy's pool and its asyncio bridge cost
about as much as the statement itself (measured: bench/async_load.py), so this
path takes a connection straight from a small set it holds:

- at most ``size`` connections, opened when first needed; a task finding none
  free waits (suspended) for one;
- a connection that failed, or whose task was cancelled mid-statement, is
  closed and never handed out again; a held connection the server dropped while
  it was idle (a restart) costs no call: the read, idempotent, is retried once on
  a new connection;
- all of them belong to the event loop that opened them, as the vault does.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg


class HeldConnections:
    """Up to ``size`` autocommit ``AsyncConnection``\\ s, for one statement at a time."""

    def __init__(self, conninfo: str, *, size: int, **connect: Any) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self._conninfo = conninfo
        self._connect = connect
        self._size = size
        # A slot per connection: a task holds one while its statement runs, so no more
        # than ``size`` connections are ever open, in use or free.
        self._slots = asyncio.Semaphore(size)
        self._free: list[psycopg.AsyncConnection[Any]] = []

    def __repr__(self) -> str:
        # The conninfo may hold a password: never in a repr.
        return f"HeldConnections(size={self._size}, free={len(self._free)})"

    async def fetch_one(self, statement: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The first row of ``statement``, run alone in autocommit.

        Raises:
            psycopg.Error: the statement or the connection failed (the connection is
                dropped; the next call opens another).
        """
        async with self._slots:
            connection, reused = await self._take()
            try:
                row = await _fetch_one(connection, statement, params)
            except psycopg.OperationalError:
                lost = connection.broken  # not a statement's own error (a timeout, say)
                await _close(connection)
                if not (reused and lost):
                    raise
                # A held connection the server dropped while it sat idle (a restart, an
                # idle timeout): the read is retried once, on a new connection.
                connection = await self._open()
                try:
                    row = await _fetch_one(connection, statement, params)
                except BaseException:
                    await _close(connection)
                    raise
            except BaseException:  # another failure, or a cancellation: state unknown
                await _close(connection)
                raise
            self._free.append(connection)
            return row

    async def close(self) -> None:
        """Close the free connections (call when no statement runs any more)."""
        while self._free:
            await _close(self._free.pop())

    async def _take(self) -> tuple[psycopg.AsyncConnection[Any], bool]:
        """A free connection (and True), or a new one (and False)."""
        while self._free:
            connection = self._free.pop()
            if not (connection.closed or connection.broken):
                return connection, True
            await _close(connection)
        return await self._open(), False

    async def _open(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, **self._connect
        )


async def _fetch_one(
    connection: psycopg.AsyncConnection[Any], statement: str, params: tuple[Any, ...]
) -> tuple[Any, ...] | None:
    cursor = await connection.execute(statement, params)
    return await cursor.fetchone()


async def _close(connection: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(Exception):
        await connection.close()
