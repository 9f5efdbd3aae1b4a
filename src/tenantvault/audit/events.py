"""Writing audit events: one INSERT in the caller's transaction, so an event exists
exactly when its change commits (no change without its record, no record without
its change).

The database does the rest (migration 0008): a trigger numbers the tenant's
events and chains their hashes under a lock on the tenant's chain head, and
refuses every UPDATE, DELETE and TRUNCATE. Callers pass ids, versions, counts
and field names in ``details`` — never a secret: there is no API here that
takes one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from tenantvault.db.models import AuditAction, AuditEvent

_MAX_TEXT = 500
Details = Mapping[str, str | int | bool | list[str] | None]


@dataclass(frozen=True)
class Event:
    """One event to append (the database adds seq, time and the chain)."""

    tenant_id: str
    action: AuditAction
    actor: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    details: Details = field(default_factory=dict)

    def row(self) -> dict[str, object]:
        return {
            "tenant_id": self.tenant_id,
            "action": self.action.value,
            "actor": None if self.actor is None else self.actor[:_MAX_TEXT],
            "target_type": self.target_type,
            "target_id": self.target_id,
            "details": dict(self.details),
        }


def record(
    connection: sa.Connection,
    tenant_id: str,
    action: AuditAction,
    *,
    actor: str | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    details: Details | None = None,
) -> None:
    """Append one event to the tenant's chain, inside ``connection``'s transaction.

    Args:
        connection: in a transaction scoped to ``tenant_id`` (or the migrator role's).
        tenant_id: whose chain.
        action: what was done.
        actor: who did it, as the caller named them.
        target_type: "config", "token", "dek" or "kek".
        target_id: the id or key version acted on.
        details: non-secret facts (versions, counts, changed field names).
    """
    event = Event(tenant_id, action, actor, target_type, target_id, details or {})
    connection.execute(sa.insert(AuditEvent).values(**event.row()))


def record_many(connection: sa.Connection, events: Iterable[Event]) -> None:
    """Append several events (of any tenants) in one round trip, in order."""
    rows = [event.row() for event in events]
    if rows:
        connection.execute(sa.insert(AuditEvent), rows)


def insert_per_row(
    rows: sa.Select[Any], action: AuditAction, *, actor: str, target_type: str
) -> sa.Insert:
    """An INSERT of one event per row of ``rows``, in their order: for a statement that
    records its own change (``rows`` selects from a data-modifying CTE), so each event
    exists exactly when its row changed, and the events cost no round trip of their own.

    Args:
        rows: three columns, per event: tenant_id, target_id (text), details (jsonb).
        action: what was done to every row.
        actor: who did it.
        target_type: the kind of thing each row is.
    """
    columns = rows.selected_columns
    return sa.insert(AuditEvent).from_select(
        ["tenant_id", "action", "actor", "target_type", "target_id", "details"],
        rows.with_only_columns(
            columns[0],
            sa.literal(action.value, sa.Text),
            sa.literal(actor[:_MAX_TEXT], sa.Text),
            sa.literal(target_type, sa.Text),
            columns[1],
            columns[2],
        ),
    )
