"""The audit log as operators see it: verify the chains, keep partitions ahead, prune.

``verify_audit`` recomputes every tenant's chain with the database's own digest
function and names the first row that breaks it: an edited row (its hash no
longer matches its content), a deleted one (a gap in ``seq``, or a chain that
ends before its head), a reordered one (``prev_hash`` not the previous row's
hash). It reads through a server-side cursor, one tenant after another, so
memory stays flat whatever the log's size.

A hash chain without a secret key proves the log was not changed by someone who
did not also recompute every later hash and the head. Anchor it outside the
database (the heads ``verify`` prints, kept elsewhere) against an attacker who
would.

``prune_audit`` drops whole monthly partitions older than the retention period
(never a row: the table refuses UPDATE and DELETE) and records, per tenant, the
first kept ``seq`` and the hash before it, so the chain still verifies from the
first kept row. ``add_partitions`` makes the coming months' partitions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import sqlalchemy as sa

from tenantvault.db.operator import OperatorDatabase
from tenantvault.errors import AuditError


@dataclass(frozen=True)
class ChainBreak:
    tenant_id: str
    seq: int
    occurred_at: datetime | None
    problem: str


@dataclass
class AuditVerifyReport:
    tenants: int = 0
    events: int = 0
    breaks: list[ChainBreak] = field(default_factory=list)
    heads: dict[str, str] = field(default_factory=dict)  # tenant -> last hash (for anchoring)

    @property
    def ok(self) -> bool:
        return not self.breaks


@dataclass(frozen=True)
class PruneReport:
    dry_run: bool
    dropped: list[str]
    events_dropped: int


@contextmanager
def _owner(db: OperatorDatabase) -> Iterator[sa.Connection]:
    """A transaction as the login itself (the owner): DDL on partitions, the heads table.
    Reading events needs ``SET LOCAL ROLE`` to the migrator (the owner is bound by
    forced row-level security)."""
    with db.engine.begin() as connection:
        yield connection


def verify_audit(db: OperatorDatabase, tenants: Sequence[str] | None = None) -> AuditVerifyReport:
    """Recompute the audit chains (of ``tenants``, or every tenant's); changes nothing."""
    report = AuditVerifyReport()
    events, heads_table = db.table("audit_events"), db.table("audit_chain_heads")
    only = "" if tenants is None else "WHERE tenant_id = ANY(:tenants)"
    params = {"tenants": list(tenants or [])}
    digest = db.table("tenantvault_audit_digest")
    # One snapshot for the heads and the events: read apart, a writer committing in
    # between would look like a deleted or changed event.
    with db.transaction(snapshot=True) as connection:
        heads = {
            row.tenant_id: row
            for row in connection.execute(
                sa.text(
                    f"SELECT tenant_id, seq, hash, first_seq, anchor_hash FROM {heads_table} {only}"
                ),
                params,
            )
        }
        rows = connection.execution_options(stream_results=True, yield_per=2000).execute(
            sa.text(
                f"SELECT tenant_id, seq, occurred_at, prev_hash, hash, "
                f"{digest}(prev_hash, tenant_id, seq, occurred_at, actor, action, target_type, "
                f"target_id, details) AS expected "
                f"FROM {events} {only} ORDER BY tenant_id, seq"
            ),
            params,
        )
        current: str | None = None
        broken = False
        last_seq, last_hash = 0, ""
        seen: set[str] = set()

        def finish(tenant_id: str) -> None:
            head = heads.get(tenant_id)
            if head is None:
                report.breaks.append(ChainBreak(tenant_id, last_seq, None, "no chain head"))
            elif not broken and (head.seq != last_seq or head.hash != last_hash):
                report.breaks.append(
                    ChainBreak(
                        tenant_id,
                        last_seq + 1,
                        None,
                        f"events after seq {last_seq} are missing (the head is at {head.seq})"
                        if head.seq != last_seq
                        else "the last event was changed after the head recorded it",
                    )
                )
            report.heads[tenant_id] = last_hash

        for row in rows:
            report.events += 1
            if row.tenant_id != current:
                if current is not None:
                    finish(current)
                current, broken = row.tenant_id, False
                seen.add(current)
                head = heads.get(current)
                last_seq = (head.first_seq if head else 1) - 1
                last_hash = head.anchor_hash if head else ""
            if broken:
                continue
            problem, at, when = None, row.seq, row.occurred_at
            if row.seq > last_seq + 1:
                problem, at, when = (
                    f"deleted (events {last_seq + 1}..{row.seq - 1} are missing)",
                    last_seq + 1,
                    None,
                )
            elif row.seq != last_seq + 1:
                problem = "seq repeated or out of order"
            elif row.prev_hash != last_hash:
                problem = "does not follow the previous event (reordered, or one was replaced)"
            elif row.hash != row.expected:
                problem = "content does not match its hash (edited)"
            if problem:
                report.breaks.append(ChainBreak(row.tenant_id, at, when, problem))
                broken = True
            last_seq, last_hash = row.seq, row.hash
        if current is not None:
            finish(current)
        # A head whose tenant has no events left at all: every event was deleted.
        for tenant_id, head in heads.items():
            if tenant_id not in seen and head.seq >= head.first_seq:
                report.breaks.append(
                    ChainBreak(tenant_id, head.first_seq, None, "every event is missing")
                )
    report.tenants = len(set(heads) | seen)
    report.breaks.sort(key=lambda b: (b.tenant_id, b.seq))
    return report


def add_partitions(db: OperatorDatabase, months_ahead: int = 24) -> int:
    """Create the monthly partitions up to ``months_ahead`` months from now; returns how
    many were new. An insert with no partition for its month fails (and so does the
    change it records), so run this at least yearly; migrations make 24 months."""
    with _owner(db) as connection:
        made = connection.execute(
            sa.text(f"SELECT {db.table('tenantvault_audit_add_partitions')}(:n)"),
            {"n": months_ahead},
        ).scalar_one()
    return int(made)


def audit_partitions(connection: sa.Connection, schema: str) -> list[tuple[str, date]]:
    """(name, first day after it) of every partition of ``schema``.audit_events."""
    rows = connection.execute(
        sa.text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(:parent) ORDER BY c.relname"
        ),
        {"parent": f"{schema}.audit_events"},
    )
    partitions = []
    for name, bound in rows:
        upper = bound.split("TO ('", 1)[1].split("'", 1)[0]
        partitions.append((name, datetime.fromisoformat(upper).date()))
    return partitions


def prune_audit(
    db: OperatorDatabase, *, keep_months: int, dry_run: bool = False, now: datetime | None = None
) -> PruneReport:
    """Drop the monthly partitions that end more than ``keep_months`` months before
    ``now``, keeping every chain verifiable from its first kept event."""
    if keep_months < 1:
        raise ValueError("keep_months must be at least 1")
    moment = (now or datetime.now(UTC)).date().replace(day=1)
    total = moment.year * 12 + moment.month - 1 - keep_months
    cutoff = date(total // 12, total % 12 + 1, 1)
    events, heads = db.table("audit_events"), db.table("audit_chain_heads")
    with _owner(db) as connection:
        old = [name for name, upper in audit_partitions(connection, db.schema) if upper <= cutoff]
        if not old:
            return PruneReport(dry_run, [], 0)
        connection.exec_driver_sql(f'SET LOCAL ROLE "{db.migrator_role}"')
        # Per tenant, the last event that goes: the chain restarts after it.
        last_dropped = connection.execute(
            sa.text(
                f"SELECT DISTINCT ON (tenant_id) tenant_id, seq, hash FROM {events} "
                "WHERE occurred_at < :cutoff ORDER BY tenant_id, seq DESC"
            ),
            {"cutoff": cutoff},
        ).all()
        count = connection.execute(
            sa.text(f"SELECT count(*) FROM {events} WHERE occurred_at < :cutoff"),
            {"cutoff": cutoff},
        ).scalar_one()
        # Times are taken at insert, seq under the chain lock: two events racing across
        # a month's end can land on either side in reverse order. Dropping the month
        # would then cut a chain in its middle: refuse, and keep everything.
        crossing = (
            connection.execute(
                sa.text(
                    f"SELECT d.tenant_id FROM (SELECT tenant_id, max(seq) AS s FROM {events} "
                    "WHERE occurred_at < :cutoff GROUP BY tenant_id) d "
                    f"JOIN (SELECT tenant_id, min(seq) AS s FROM {events} "
                    "WHERE occurred_at >= :cutoff GROUP BY tenant_id) k "
                    "USING (tenant_id) WHERE k.s < d.s ORDER BY 1"
                ),
                {"cutoff": cutoff},
            )
            .scalars()
            .all()
        )
        if crossing:
            raise AuditError(
                f"audit prune refused: the chains of tenants {', '.join(crossing)} cross "
                f"{cutoff} out of order; nothing dropped (keep one month more)"
            )
        connection.exec_driver_sql("RESET ROLE")
        if dry_run:
            return PruneReport(True, old, int(count))
        for tenant_id, seq, hash_ in last_dropped:
            connection.execute(
                sa.text(
                    f"UPDATE {heads} SET first_seq = :seq + 1, anchor_hash = :hash "
                    "WHERE tenant_id = :t"
                ),
                {"t": tenant_id, "seq": seq, "hash": hash_},
            )
        for name in old:
            connection.exec_driver_sql(
                f'ALTER TABLE {events} DETACH PARTITION "{db.schema}"."{name}"'
            )
            connection.exec_driver_sql(f'DROP TABLE "{db.schema}"."{name}"')
    return PruneReport(False, old, int(count))
