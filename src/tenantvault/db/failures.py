"""What a database error may say: the server's primary message, nothing more.

Its DETAIL line can quote a row (``Failing row contains (...)``, sealed values
included), and SQLAlchemy's text adds the statement; neither goes into a
tenantvault message.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError


def server_message(error: BaseException) -> str | None:
    """The primary message the server sent for ``error`` (a driver error, or
    SQLAlchemy's wrapper of one); None when it sent none (the connection failed)."""
    driver_error = error.orig if isinstance(error, DBAPIError) else error
    diag = getattr(driver_error, "diag", None)
    primary = getattr(diag, "message_primary", None)
    return str(primary) if primary else None
