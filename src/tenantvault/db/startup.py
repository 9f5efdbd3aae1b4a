"""What every new connection is opened with: the statement timeout, and whether
statements are prepared on the server.

Directly on PostgreSQL both are per connection: the timeout is a startup option
(``options=-c statement_timeout=...``) and psycopg prepares a statement after its
fifth run. Behind a pooler in transaction mode (PgBouncer) a client connection
is not a server connection: PgBouncer 1.18 refuses the ``options`` startup
parameter, and a statement prepared in one transaction is missing (or already
there) on the server connection the next one gets. So each can be turned off
(``send_statement_timeout``, ``server_prepared_statements``); a timeout not sent
is the server's own (set on the login role or the database, which every server
connection of the pool logs in with), and each new connection checks it is the
configured one, so a pooler's setup cannot lose it silently.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import event

from tenantvault.errors import ConfigurationError
from tenantvault.settings import Settings

# pg_settings gives the timeout in its unit (ms) as a plain number; SHOW says "30s".
_SERVER_TIMEOUT = "SELECT setting FROM pg_settings WHERE name = 'statement_timeout'"


def connect_args(settings: Settings) -> dict[str, Any]:
    """psycopg's ``connect()`` keywords for ``settings``' connections."""
    args: dict[str, Any] = {"connect_timeout": settings.connect_timeout_seconds}
    if settings.send_statement_timeout:
        args["options"] = f"-c statement_timeout={settings.statement_timeout_ms}"
    if not settings.server_prepared_statements:
        args["prepare_threshold"] = None  # psycopg: never prepare, even when asked to
    return args


def check_server_timeout(engine: Any, settings: Settings) -> None:
    """When the timeout is not sent, make each new connection of ``engine`` (a sync
    ``Engine``, or an ``AsyncEngine``'s ``sync_engine``) check the server's.

    The check raises :class:`ConfigurationError` out of the connect, naming the
    settings and both values (a number of milliseconds is no secret).
    """
    if settings.send_statement_timeout:
        return
    expected = settings.statement_timeout_ms

    def verify(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(_SERVER_TIMEOUT)
            row = cursor.fetchone()
        finally:
            cursor.close()
        # The SELECT opened a transaction: ended here, so a pooler in transaction mode
        # gets its server connection back before the connection is handed out.
        dbapi_connection.rollback()
        _check_timeout(row, expected)

    event.listen(engine, "connect", verify)


AsyncCheck = Callable[[Any], Awaitable[None]]


def async_server_timeout_check(settings: Settings) -> AsyncCheck | None:
    """:func:`check_server_timeout` for connections opened straight with psycopg's
    ``AsyncConnection`` in autocommit (AsyncVault's held ones); None when the timeout
    is sent."""
    if settings.send_statement_timeout:
        return None
    expected = settings.statement_timeout_ms

    async def verify(connection: Any) -> None:
        cursor = await connection.execute(_SERVER_TIMEOUT)
        _check_timeout(await cursor.fetchone(), expected)

    return verify


def _check_timeout(row: Any, expected: int) -> None:
    server = int(row[0]) if row is not None else None
    if server != expected:
        raise ConfigurationError(
            "TENANTVAULT_SEND_STATEMENT_TIMEOUT is false, so the server's "
            f"statement_timeout applies, and it is {server} ms, not the "
            f"{expected} ms of TENANTVAULT_STATEMENT_TIMEOUT_MS: set it on the login "
            f"role or the database (ALTER ROLE ... SET statement_timeout = {expected})"
        )
