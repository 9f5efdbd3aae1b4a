"""What a database error may say, and what it is as tenantvault's error.

Its DETAIL line can quote a row (``Failing row contains (...)``, sealed values
included), a data error's primary message quotes the value refused (``invalid input
syntax for type integer: "..."``), and SQLAlchemy's text adds the statement; none of
them goes into a tenantvault message. :func:`tenantvault_error` names the condition
by its SQLSTATE instead, and quotes the server only where its text names objects
(a missing table, a privilege) or is fixed (a timeout). :func:`translating` is how
the facades apply it, once, to every public method (``tenantvault.vault.methods``).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar, cast

import psycopg
import psycopg.errors
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from tenantvault.errors import (
    DatabaseError,
    DatabaseTimeout,
    DatabaseUnavailable,
    InvalidInputError,
    SchemaNotMigrated,
    TenantVaultError,
)

F = TypeVar("F", bound=Callable[..., Any])

# SQLSTATEs (PostgreSQL's appendix A) by what the caller can do; a class (two
# characters) or a code. Connection exceptions, insufficient resources (too many
# connections), and a server shutting down or starting: try again later.
_UNAVAILABLE = ("08", "53", "57P01", "57P02", "57P03")
# query_canceled (statement_timeout, a cancel request), lock_not_available
# (lock_timeout), and the idle timeouts that end a session.
_TIMED_OUT = ("57014", "55P03", "25P03", "57P05")
# The schema, a table, a column, a type or a function the code needs is missing.
_NOT_MIGRATED = ("3F000", "42P01", "42703", "42704", "42883")
# Conditions whose primary message names only objects or is the server's fixed text.
_QUOTABLE = (*_NOT_MIGRATED, *_TIMED_OUT, "42501")


def server_message(error: BaseException) -> str | None:
    """The primary message the server sent for ``error`` (a driver error, or
    SQLAlchemy's wrapper of one); None when it sent none (the connection failed)."""
    driver_error = error.orig if isinstance(error, DBAPIError) else error
    diag = getattr(driver_error, "diag", None)
    primary = getattr(diag, "message_primary", None)
    return str(primary) if primary else None


def connection_failure(error: BaseException) -> str:
    """libpq's text for a connection that failed, as one line: it names host, port,
    user and database, never the password, and no statement."""
    return " ".join(str(error).split()).replace("connection failed: ", "")


def _condition(sqlstate: str) -> str:
    """The condition's name in words (``QueryCanceled``: ``query canceled``)."""
    try:
        name = psycopg.errors.lookup(sqlstate).__name__
    except KeyError:
        return "an error"
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()


def tenantvault_error(error: BaseException) -> TenantVaultError | None:
    """What ``error`` (psycopg's, or SQLAlchemy's around it) is as tenantvault's own
    error, its message without a statement or a value; None when it is no database
    error (a caller's misuse of its own SQLAlchemy session stays as it is)."""
    if isinstance(error, PoolTimeout):
        return DatabaseUnavailable("no database connection came free within the pool's timeout")
    driver = error.orig if isinstance(error, DBAPIError) else error
    if not isinstance(driver, psycopg.Error):
        if isinstance(error, DBAPIError):
            return DatabaseError(f"the database driver failed: {type(driver).__name__}")
        return None
    state = driver.sqlstate
    if state is None:  # raised by the client: nothing reached the server, or nothing came
        if isinstance(driver, psycopg.OperationalError):
            return DatabaseUnavailable(f"cannot reach the database: {connection_failure(driver)}")
        if isinstance(driver, psycopg.DataError):
            return InvalidInputError(
                "an argument cannot be sent to PostgreSQL (text must not contain a NUL "
                "character; numbers must fit their column)"
            )
        return DatabaseError(f"the database driver failed: {type(driver).__name__}")
    said = server_message(driver) if state.startswith(_QUOTABLE) else None
    named = f"{said or _condition(state)} (SQLSTATE {state})"
    if state.startswith(_UNAVAILABLE):
        return DatabaseUnavailable(f"the database cannot serve the call: {named}")
    if state.startswith(_TIMED_OUT):
        return DatabaseTimeout(
            f"the database cancelled the statement: {named}; TENANTVAULT_STATEMENT_TIMEOUT_MS "
            "sets the statement timeout"
        )
    if state.startswith(_NOT_MIGRATED):
        return SchemaNotMigrated(
            f"the database has no tenantvault schema of this version ({named}): run "
            "`tenantvault migrate` (or check TENANTVAULT_SCHEMA_NAME)"
        )
    if state.startswith("22"):  # a data exception: the value refused is not named
        return InvalidInputError(f"a value was refused by the database: {named}")
    return DatabaseError(f"the database refused the statement: {named}")


def translating(function: F) -> F:
    """``function`` (a function or a coroutine function) raising, for a database error,
    :func:`tenantvault_error`'s error instead, the driver's error as its ``__cause__``."""
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def awaited(*args: Any, **kwargs: Any) -> Any:
            try:
                return await function(*args, **kwargs)
            except (psycopg.Error, SQLAlchemyError) as error:
                _raise_translated(error)

        return cast(F, awaited)

    @functools.wraps(function)
    def called(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (psycopg.Error, SQLAlchemyError) as error:
            _raise_translated(error)

    return cast(F, called)


def _raise_translated(error: BaseException) -> NoReturn:
    """Raise :func:`tenantvault_error`'s error for ``error``, chained to the driver's own
    error (not SQLAlchemy's wrapper, whose text holds the statement); or ``error``."""
    mapped = tenantvault_error(error)
    if mapped is None:
        raise error
    orig = error.orig if isinstance(error, DBAPIError) else None
    raise mapped from orig if isinstance(orig, BaseException) else error
