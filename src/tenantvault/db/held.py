"""Connections held open for the load hot path: :class:`HeldConnections` (``Vault``,
across threads) and :class:`AsyncHeldConnections` (``AsyncVault``, on one loop).

The hot path is one statement in autocommit: the database function scopes the
tenant with ``set_config(..., true)``, which ends with that statement, so nothing
of a tenant stays on a connection. A pool checkout, a new cursor and autocommit
toggles cost about as much as the statement itself (measured: bench/vault_load.py,
bench/async_load.py), so this path keeps a few connections in autocommit, each
with its cursor, and runs the statement straight on one:

- at most ``size`` connections, opened when first needed; a caller finding none
  free waits for one;
- a connection whose statement failed, or whose caller was cancelled mid-statement,
  is closed and never handed out again; a held connection the server dropped while
  it was idle (a restart) costs no call: the read, idempotent, is retried once on a
  new connection;
- the statement is prepared on the server after its first few runs, as psycopg
  does, unless the connections are opened with ``prepare_threshold=None`` (the
  ``server_prepared_statements`` setting, for a pooler that cannot keep them).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import psycopg

Row = tuple[Any, ...]


class HeldConnections:
    """Up to ``size`` autocommit connections, one statement at a time each; thread-safe."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], *, size: int) -> None:
        """Hold at most ``size`` connections, each opened by ``connect``."""
        if size < 1:
            raise ValueError("size must be at least 1")
        self._connect = connect
        self._size = size
        # A slot per connection: a thread holds one while its statement runs, so no
        # more than ``size`` connections are ever open, in use or free.
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._free: list[psycopg.Cursor[Any]] = []

    def __repr__(self) -> str:
        # A connection's conninfo may hold a password: never in a repr.
        return f"HeldConnections(size={self._size}, free={len(self._free)})"

    def fetch_one(self, statement: str, params: tuple[Any, ...]) -> Row | None:
        """The first row of ``statement``, run alone in autocommit.

        Raises:
            psycopg.Error: the statement or the connection failed (the connection is
                dropped; the next call opens another).
        """
        with self._slots:
            cursor, reused = self._take()
            try:
                row = _fetch(cursor, statement, params)
            except psycopg.OperationalError:
                lost = cursor.connection.broken  # not a statement's own error (a timeout)
                _close(cursor)
                if not (reused and lost):
                    raise
                # A held connection the server dropped while it sat idle (a restart, an
                # idle timeout): the read is retried once, on a new connection.
                cursor = self._open()
                try:
                    row = _fetch(cursor, statement, params)
                except BaseException:
                    _close(cursor)
                    raise
            except BaseException:  # another failure, or an interruption: state unknown
                _close(cursor)
                raise
            with self._lock:
                self._free.append(cursor)
            return row

    def close(self) -> None:
        """Close the free connections (call when no statement runs any more)."""
        with self._lock:
            free, self._free = self._free, []
        for cursor in free:
            _close(cursor)

    def _take(self) -> tuple[psycopg.Cursor[Any], bool]:
        """A free connection's cursor (and True), or a new one's (and False)."""
        while True:
            with self._lock:
                cursor = self._free.pop() if self._free else None
            if cursor is None:
                return self._open(), False
            if not (cursor.connection.closed or cursor.connection.broken):
                return cursor, True
            _close(cursor)

    def _open(self) -> psycopg.Cursor[Any]:
        connection = self._connect()
        connection.autocommit = True
        return connection.cursor()


def _fetch(cursor: psycopg.Cursor[Any], statement: str, params: tuple[Any, ...]) -> Row | None:
    cursor.execute(statement, params)
    return cursor.fetchone()


def _close(cursor: psycopg.Cursor[Any]) -> None:
    with contextlib.suppress(Exception):
        cursor.connection.close()


class AsyncHeldConnections:
    """Up to ``size`` autocommit ``AsyncConnection``\\ s, for one statement at a time.

    All of them belong to the event loop that opened them, as the vault does.
    """

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
        return f"AsyncHeldConnections(size={self._size}, free={len(self._free)})"

    async def fetch_one(self, statement: str, params: tuple[Any, ...]) -> Row | None:
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
                await _aclose(connection)
                if not (reused and lost):
                    raise
                # As HeldConnections: a connection dropped while idle is retried once.
                connection = await self._open()
                try:
                    row = await _fetch_one(connection, statement, params)
                except BaseException:
                    await _aclose(connection)
                    raise
            except BaseException:  # another failure, or a cancellation: state unknown
                await _aclose(connection)
                raise
            self._free.append(connection)
            return row

    async def close(self) -> None:
        """Close the free connections (call when no statement runs any more)."""
        while self._free:
            await _aclose(self._free.pop())

    async def _take(self) -> tuple[psycopg.AsyncConnection[Any], bool]:
        """A free connection (and True), or a new one (and False)."""
        while self._free:
            connection = self._free.pop()
            if not (connection.closed or connection.broken):
                return connection, True
            await _aclose(connection)
        return await self._open(), False

    async def _open(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, **self._connect
        )


async def _fetch_one(
    connection: psycopg.AsyncConnection[Any], statement: str, params: tuple[Any, ...]
) -> Row | None:
    cursor = await connection.execute(statement, params)
    return await cursor.fetchone()


async def _aclose(connection: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(Exception):
        await connection.close()
