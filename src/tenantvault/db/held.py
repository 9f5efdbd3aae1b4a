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
from collections.abc import Awaitable, Callable
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
        # One lock guards the free list and the count of open connections (in use or
        # free), so no more than ``size`` are ever open. The fast path takes it twice
        # and nothing else: a semaphore would cost more than the rest of the call.
        self._lock = threading.Condition(threading.Lock())
        self._free: list[psycopg.Cursor[Any]] = []
        self._open_count = 0
        self._waiting = 0

    def __repr__(self) -> str:
        # A connection's conninfo may hold a password: never in a repr.
        return f"HeldConnections(size={self._size}, free={len(self._free)})"

    def fetch_one(self, statement: str, params: tuple[Any, ...]) -> Row | None:
        """The first row of ``statement``, run alone in autocommit.

        Raises:
            psycopg.Error: the statement or the connection failed (the connection is
                dropped; the next call opens another).
        """
        cursor, reused = self._take()
        try:
            row = _fetch(cursor, statement, params)
        except psycopg.OperationalError:
            lost = cursor.connection.broken  # not a statement's own error (a timeout)
            if not (reused and lost):
                self._drop(cursor)
                raise
            # A held connection the server dropped while it sat idle (a restart, an
            # idle timeout): the read is retried once, on a new connection in its slot.
            _close(cursor)
            cursor = self._opened_in_slot()
            try:
                row = _fetch(cursor, statement, params)
            except BaseException:
                self._drop(cursor)
                raise
        except BaseException:  # another failure, or an interruption: state unknown
            self._drop(cursor)
            raise
        with self._lock:
            self._free.append(cursor)
            if self._waiting:
                self._lock.notify()
        return row

    def close(self) -> None:
        """Close the free connections (call when no statement runs any more)."""
        with self._lock:
            free, self._free = self._free, []
            self._open_count -= len(free)
        for cursor in free:
            _close(cursor)

    def _take(self) -> tuple[psycopg.Cursor[Any], bool]:
        """A free connection's cursor (and True), or a new one's (and False); waits
        while ``size`` connections are open and none is free."""
        with self._lock:
            while not self._free and self._open_count >= self._size:
                self._waiting += 1
                try:
                    self._lock.wait()
                finally:
                    self._waiting -= 1
            if self._free:
                cursor = self._free.pop()
                if not (cursor.connection.closed or cursor.connection.broken):
                    return cursor, True
                _close(cursor)  # known dead: its slot goes to a new connection
            else:
                self._open_count += 1
        return self._opened_in_slot(), False

    def _opened_in_slot(self) -> psycopg.Cursor[Any]:
        """A new connection's cursor, in a slot already counted (freed if it fails)."""
        try:
            connection = self._connect()
            connection.autocommit = True
            return connection.cursor()
        except BaseException:
            self._release_slot()
            raise

    def _drop(self, cursor: psycopg.Cursor[Any]) -> None:
        _close(cursor)
        self._release_slot()

    def _release_slot(self) -> None:
        with self._lock:
            self._open_count -= 1
            if self._waiting:
                self._lock.notify()


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

    def __init__(
        self,
        conninfo: str,
        *,
        size: int,
        check: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None,
        **connect: Any,
    ) -> None:
        """Hold at most ``size`` connections to ``conninfo``, opened with ``connect``'s
        keywords; ``check`` runs on each new one (a refusal closes it and raises)."""
        if size < 1:
            raise ValueError("size must be at least 1")
        self._check = check
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
        connection = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, **self._connect
        )
        if self._check is not None:
            try:
                await self._check(connection)
            except BaseException:
                await _aclose(connection)
                raise
        return connection


async def _fetch_one(
    connection: psycopg.AsyncConnection[Any], statement: str, params: tuple[Any, ...]
) -> Row | None:
    cursor = await connection.execute(statement, params)
    return await cursor.fetchone()


async def _aclose(connection: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(Exception):
        await connection.close()
