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

from collections.abc import Mapping

import sqlalchemy as sa

from tenantvault.models import AuditAction, AuditEvent

_MAX_TEXT = 500


def _bounded(value: str | None) -> str | None:
    return None if value is None else value[:_MAX_TEXT]


def record(
    connection: sa.Connection,
    tenant_id: str,
    action: AuditAction,
    *,
    actor: str | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    details: Mapping[str, str | int | bool | list[str] | None] | None = None,
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
    connection.execute(
        sa.insert(AuditEvent).values(
            tenant_id=tenant_id,
            action=action.value,
            actor=_bounded(actor),
            target_type=target_type,
            target_id=target_id,
            details=dict(details or {}),
        )
    )
