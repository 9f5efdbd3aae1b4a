"""Any exception a command ends with, as the text of its one ``FAILED:`` line.

tenantvault's own errors already say what failed without a secret. Errors of the
database driver are reduced to the server's primary message
(:func:`tenantvault.db.failures.server_message`). Anything else is a bug, named by
its type only, since its text was never checked for secrets.
"""

from __future__ import annotations

import psycopg
from alembic.util import CommandError
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from tenantvault.db.failures import connection_failure, server_message
from tenantvault.errors import TenantVaultError


def _driver_error(error: BaseException) -> str:
    primary = server_message(error)
    if primary:
        return f"the database refused: {primary}"
    # No server message: the connection itself failed.
    if isinstance(error, psycopg.OperationalError):
        return f"cannot connect to the database: {connection_failure(error)}"
    return f"the database driver failed: {type(error).__name__}"


def describe(exc: BaseException) -> str:
    """The reason a command failed, in one line, without a secret."""
    if isinstance(exc, TenantVaultError):
        return " ".join(str(exc).split())
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return _driver_error(exc.orig)
    if isinstance(exc, psycopg.Error):
        return _driver_error(exc)
    if isinstance(exc, SQLAlchemyError):
        return f"the database layer failed: {type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    if isinstance(exc, CommandError):
        return f"migration: {' '.join(str(exc).split())}"
    return f"unexpected {type(exc).__name__}: a bug in tenantvault; please report it"
