"""Values sealed in a format older than the current one open only where the database
says so, for the application and the operator alike (migration 0013).

The database keeps one switch (``tenantvault_sealing.legacy_open``) and the record of
every older value the upgrade found, with what it sat beside then; its function
``tenantvault_legacy_opens`` answers for one value. An older value put into a row
later (from a backup, say), or left in place beside a rewritten config, is refused:
it neither opens nor gets re-sealed into the current format's binding. The hot paths
open the current format only (a prefix test); an older value takes the full path,
which asks here, as key rotation does.
"""

from __future__ import annotations

import sqlalchemy as sa

from tenantvault.crypto.envelope import SealContext, is_current_format
from tenantvault.db.session import function_name
from tenantvault.errors import DecryptionError
from tenantvault.keys.sealed import SealedColumn

# Migration 0013's names: the switch, the record and the function that reads both.
SWITCH_TABLE = "tenantvault_sealing"
RECORD_TABLE = "tenantvault_legacy_values"
OPENS_FUNCTION = "tenantvault_legacy_opens"


def sql_opens(column: SealedColumn, function: str) -> str:
    """An SQL condition on a row ``t`` of ``column``'s table: the database lets its
    value (an older-format one; current ones need no asking) open. ``function`` is
    :data:`OPENS_FUNCTION`, qualified for the caller's schema."""
    return (
        f"{function}(t.tenant_id, '{column.table}', '{column.column}', "
        f"{column.sql_row_id('t')}, t.{column.column})"
    )


def database_allows(connection: sa.Connection, place: SealContext, sealed: str) -> bool:
    """Whether the database lets ``sealed``, an older-format value of ``place``, open."""
    return bool(
        connection.execute(
            sa.text(
                f"SELECT {function_name(connection, OPENS_FUNCTION)}("
                ":tenant, :table, :column, :row, :value)"
            ),
            {
                "tenant": place.tenant_id,
                "table": place.table,
                "column": place.column,
                "row": place.row_id,
                "value": sealed,
            },
        ).scalar()
    )


def check_allowed(connection: sa.Connection, place: SealContext, sealed: str) -> None:
    """Refuse ``sealed`` unless it is in the current format or the database allows it.

    Raises:
        DecryptionError: an older-format value the database does not let open.
    """
    if not is_current_format(sealed) and not database_allows(connection, place, sealed):
        raise DecryptionError("cannot open sealed value")
