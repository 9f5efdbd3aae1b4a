"""The audit log as operators see it: verify the chains, keep partitions ahead, prune.

``verify_audit`` recomputes every tenant's chain in Python
(:mod:`tenantvault.audit.digest`, never the database's function, which the owner
could replace) and names every row that breaks it: an edited row (its hash
no longer matches its content), a deleted one (a gap in ``seq``, or a chain that
ends before its head), a reordered one (``prev_hash`` not the previous row's
hash). A break does not stop the scan: each row is checked against the row stored
before it, so an edit behind an earlier one is reported too, and the heads it
reports are where the chains really end. It reads heads and events in one
snapshot, through a server-side cursor, one tenant after another, so memory
stays flat whatever the log's size.

Two things the database owner could still forge are authenticated from outside:

- where retention cut a chain's start (``first_seq``, ``anchor_hash``): ``prune``
  stores the key provider's MAC of it, and ``verify`` checks that MAC with the
  key provider (a key the owner does not hold);
- where a chain ends: the heads ``verify`` reports, kept by the operator outside
  the database and given back as ``expected_heads``, must still be on the chain.

``prune_audit`` drops whole monthly partitions older than the retention period
(never a row: the table refuses UPDATE and DELETE) and records, per tenant, the
first kept ``seq`` and the hash before it, so the chain still verifies from the
first kept row. Before it MACs any such marker it verifies every chain it cuts
(and every head kept outside it is given), with the months to drop locked so
that what it verified is what goes, and refuses on any break: a marker it
signed would otherwise vouch for whatever the owner had moved into an old month.
``add_partitions`` makes the coming months' partitions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from tenantvault.audit.digest import event_hash
from tenantvault.db.operator import OperatorDatabase
from tenantvault.errors import AuditChainBroken, AuditError


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
    heads: dict[str, Head] = field(default_factory=dict)  # where each chain ends: keep these

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def broken_tenants(self) -> list[str]:
        """The tenants with at least one break, sorted."""
        return sorted({b.tenant_id for b in self.breaks})


@dataclass(frozen=True)
class PruneReport:
    dry_run: bool
    dropped: list[str]
    events_dropped: int
    chains_verified: int = 0  # the chains it cut (and those of the heads it was given)


@contextmanager
def _owner(db: OperatorDatabase) -> Iterator[sa.Connection]:
    """A transaction as the login itself (the owner): DDL on partitions, the heads table.
    Reading events needs ``SET LOCAL ROLE`` to the migrator (the owner is bound by
    forced row-level security)."""
    with db.engine.begin() as connection:
        yield connection


MacCheck = Callable[[bytes, str], bool]


def anchor_message(tenant_id: str, first_seq: int, anchor_hash: str) -> bytes:
    """What retention's MAC covers: the tenant, the first kept seq, the hash before it."""
    return f"tenantvault.audit.anchor\x00{tenant_id}\x00{first_seq}\x00{anchor_hash}".encode()


@dataclass(frozen=True)
class Head:
    """Where a chain ended when verified: keep these outside the database."""

    seq: int
    hash: str


def verify_audit(
    db: OperatorDatabase,
    tenants: Sequence[str] | None = None,
    *,
    check_mac: MacCheck | None = None,
    expected_heads: Mapping[str, Head] | None = None,
) -> AuditVerifyReport:
    """Recompute the audit chains (of ``tenants``, or every tenant's); changes nothing.

    Args:
        check_mac: the key provider's MAC check, for chains whose start retention cut
            (called only for those; without it such a chain is reported unverified).
        expected_heads: heads an earlier verify reported, kept outside the database:
            each must still be an event of its chain (or before its authenticated start).
    """
    report = AuditVerifyReport()
    events, heads_table = db.table("audit_events"), db.table("audit_chain_heads")
    only = "" if tenants is None else "WHERE tenant_id = ANY(:tenants)"
    params = {"tenants": list(tenants or [])}
    expected = dict(expected_heads or {})
    if tenants is not None:
        expected = {t: h for t, h in expected.items() if t in set(tenants)}
    # One snapshot for the heads and the events: read apart, a writer committing in
    # between would look like a deleted or changed event.
    with db.transaction(snapshot=True) as connection:
        heads = {
            row.tenant_id: row
            for row in connection.execute(
                sa.text(
                    "SELECT tenant_id, seq, hash, first_seq, anchor_hash, anchor_mac "
                    f"FROM {heads_table} {only}"
                ),
                params,
            )
        }
        # details as the jsonb's text: decoded by the driver, its numbers would be
        # floats, which lost what the trigger hashed (see tenantvault.audit.digest).
        rows = connection.execution_options(stream_results=True, yield_per=2000).execute(
            sa.text(
                "SELECT tenant_id, seq, occurred_at, actor, action, target_type, target_id, "
                f"details::text AS details, prev_hash, hash FROM {events} {only} "
                "ORDER BY tenant_id, seq"
            ),
            params,
        )
        chain = _Chain(report, heads, expected, check_mac)
        for row in rows:
            chain.add(row)
        chain.finish_all()
    report.tenants = len(set(heads) | chain.seen)
    report.breaks.sort(key=lambda b: (b.tenant_id, b.seq))
    return report


def _expected_hash(row: Any) -> str | None:
    """The hash ``row`` must carry (``row.details`` is the jsonb's text); None when it
    holds what tenantvault never writes."""
    try:
        details = json.loads(row.details, parse_float=Decimal)
        return event_hash(
            row.prev_hash,
            row.tenant_id,
            row.seq,
            row.occurred_at,
            row.actor,
            row.action,
            row.target_type,
            row.target_id,
            details,
        )
    except (TypeError, ValueError):
        return None


class _Chain:
    """The scan of ``verify_audit``: one tenant's chain at a time, in seq order.

    Every row is checked against the row stored before it (its seq follows, its
    ``prev_hash`` is that row's hash) and against its own content; a break is
    reported and the scan goes on from the row as stored, so one break hides no
    other, and the head it reports is where the chain really ends."""

    def __init__(
        self,
        report: AuditVerifyReport,
        heads: Mapping[str, Any],
        expected: Mapping[str, Head],
        check_mac: MacCheck | None,
    ) -> None:
        self.report, self.heads, self.expected, self.check_mac = report, heads, expected, check_mac
        self.seen: set[str] = set()
        self.current: str | None = None
        self.last_seq, self.last_hash = 0, ""
        self.met_expected = False

    def _break(self, seq: int, occurred_at: datetime | None, problem: str) -> None:
        assert self.current is not None
        self.report.breaks.append(ChainBreak(self.current, seq, occurred_at, problem))

    def _start(self, tenant_id: str) -> None:
        self.current, self.met_expected = tenant_id, False
        self.seen.add(tenant_id)
        head = self.heads.get(tenant_id)
        first_seq = head.first_seq if head else 1
        self.last_seq = first_seq - 1
        self.last_hash = head.anchor_hash if head else ""
        if first_seq > 1 and not self._anchor_authentic(tenant_id, head):
            self._break(
                first_seq,
                None,
                "where retention cut the chain is not authenticated "
                "(the start marker was moved, or checked without the key provider)",
            )
        kept = self.expected.get(tenant_id)
        if kept is not None and kept.seq < first_seq:
            self.met_expected = True  # retention dropped it, behind an authenticated start

    def _anchor_authentic(self, tenant_id: str, head: Any) -> bool:
        if self.check_mac is None or head.anchor_mac is None:
            return False
        message = anchor_message(tenant_id, head.first_seq, head.anchor_hash)
        return self.check_mac(message, head.anchor_mac)

    def add(self, row: Any) -> None:
        self.report.events += 1
        if row.tenant_id != self.current:
            if self.current is not None:
                self.finish(self.current)
            self._start(row.tenant_id)
        if row.seq <= self.last_seq:
            # A second row at a seq already checked (or before the chain's start): it
            # is not part of the chain, which goes on from the row before it.
            self._break(row.seq, row.occurred_at, "seq repeated or out of order")
            return
        problem = None
        if row.seq > self.last_seq + 1:
            # Its link cannot be checked (the row before it is gone); its content can.
            self._break(
                self.last_seq + 1,
                None,
                f"deleted (events {self.last_seq + 1}..{row.seq - 1} are missing)",
            )
        elif row.prev_hash != self.last_hash:
            problem = "does not follow the previous event (reordered, or one was replaced)"
        if problem is None and row.hash != _expected_hash(row):
            problem = "content does not match its hash (edited)"
        if problem:
            self._break(row.seq, row.occurred_at, problem)
        self.last_seq, self.last_hash = row.seq, row.hash
        kept = self.expected.get(row.tenant_id)
        if kept is not None and kept.seq == row.seq:
            if kept.hash != row.hash:
                self._break(row.seq, row.occurred_at, "differs from the head kept outside")
            self.met_expected = True

    def finish(self, tenant_id: str) -> None:
        head = self.heads.get(tenant_id)
        kept = self.expected.get(tenant_id)
        if head is None:
            self.report.breaks.append(ChainBreak(tenant_id, self.last_seq, None, "no chain head"))
        elif head.seq > self.last_seq:
            self.report.breaks.append(
                ChainBreak(
                    tenant_id,
                    self.last_seq + 1,
                    None,
                    f"events after seq {self.last_seq} are missing (the head is at {head.seq})",
                )
            )
        elif head.seq < self.last_seq:
            self.report.breaks.append(
                ChainBreak(
                    tenant_id,
                    head.seq + 1,
                    None,
                    f"events {head.seq + 1}..{self.last_seq} were added past the head "
                    "(not by the chain's trigger)",
                )
            )
        elif head.hash != self.last_hash:
            self.report.breaks.append(
                ChainBreak(
                    tenant_id,
                    self.last_seq,
                    None,
                    "the last event was changed after the head recorded it",
                )
            )
        if kept is not None and not self.met_expected:
            self.report.breaks.append(
                ChainBreak(
                    tenant_id,
                    kept.seq,
                    None,
                    f"the chain ends at seq {self.last_seq}, before the head kept outside "
                    f"(seq {kept.seq}): events were cut from its end",
                )
            )
        self.report.heads[tenant_id] = Head(self.last_seq, self.last_hash)

    def finish_all(self) -> None:
        if self.current is not None:
            self.finish(self.current)
        for tenant_id, head in self.heads.items():
            if tenant_id in self.seen:
                continue
            if head.first_seq > 1 and not self._anchor_authentic(tenant_id, head):
                self.report.breaks.append(
                    ChainBreak(
                        tenant_id,
                        head.first_seq,
                        None,
                        "where retention cut the chain is not authenticated (the start "
                        "marker was moved, or checked without the key provider)",
                    )
                )
            elif head.seq >= head.first_seq:
                # A head whose tenant has no events left at all: every event was deleted.
                self.report.breaks.append(
                    ChainBreak(tenant_id, head.first_seq, None, "every event is missing")
                )
            else:
                kept = self.expected.get(tenant_id)
                if kept is not None and kept.seq >= head.first_seq:
                    # Retention took every event up to head.seq; the kept head is later.
                    self.report.breaks.append(
                        ChainBreak(
                            tenant_id,
                            kept.seq,
                            None,
                            f"the chain has no event after its retention start "
                            f"(seq {head.first_seq}), before the head kept outside "
                            f"(seq {kept.seq}): events were cut from its end",
                        )
                    )
                self.report.heads[tenant_id] = Head(head.seq, head.hash)
        for tenant_id, kept in self.expected.items():
            if tenant_id not in self.seen and tenant_id not in self.heads:
                self.report.breaks.append(
                    ChainBreak(tenant_id, kept.seq, None, "the whole chain is gone")
                )


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
    db: OperatorDatabase,
    *,
    keep_months: int,
    mac: Callable[[bytes], str] | None = None,
    check_mac: MacCheck | None = None,
    expected_heads: Mapping[str, Head] | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
) -> PruneReport:
    """Drop the monthly partitions that end more than ``keep_months`` months before
    ``now``, keeping every chain verifiable from its first kept event.

    First, with those months locked (nobody, the owner included, can add, move or
    change their rows until they are dropped), it verifies the whole chain of every
    tenant it cuts, and of every tenant in ``expected_heads``: on any break it
    raises :class:`~tenantvault.errors.AuditChainBroken` and changes nothing (a dry
    run too), so a start marker it MACs never vouches for a broken chain.

    Args:
        mac: the key provider's MAC: where each chain now starts is authenticated
            with it (required unless ``dry_run``).
        check_mac: the key provider's MAC check, for chains an earlier prune cut
            (without it, such a chain is unverified, and the prune refuses).
        expected_heads: heads an earlier verify reported, kept outside the database:
            each must still be on its chain. Without them, a chain the owner
            re-hashed whole (and its head with it) cannot be told from an honest one.
    """
    if keep_months < 1:
        raise ValueError("keep_months must be at least 1")
    if mac is None and not dry_run:
        raise AuditError(
            "audit prune needs the key provider, to authenticate where each chain now "
            "starts; nothing dropped"
        )
    moment = (now or datetime.now(UTC)).date().replace(day=1)
    total = moment.year * 12 + moment.month - 1 - keep_months
    cutoff = date(total // 12, total % 12 + 1, 1)
    events, heads = db.table("audit_events"), db.table("audit_chain_heads")
    with _owner(db) as connection:
        old = [name for name, upper in audit_partitions(connection, db.schema) if upper <= cutoff]
        if not old:
            return PruneReport(dry_run, [], 0)
        # SHARE: readers go on, every writer of these months (a row moved in or out
        # included) waits until they are dropped. The verify below starts after the
        # lock is held, so the rows it checks are the rows that go.
        for name in old:
            connection.exec_driver_sql(f'LOCK TABLE "{db.schema}"."{name}" IN SHARE MODE')
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
        cut = {tenant_id for tenant_id, _, _ in last_dropped}
        verified = _verify_before_cutting(db, cut, check_mac, expected_heads)
        if dry_run:
            return PruneReport(True, old, int(count), verified)
        assert mac is not None
        for tenant_id, seq, hash_ in last_dropped:
            connection.execute(
                sa.text(
                    f"UPDATE {heads} SET first_seq = :first, anchor_hash = :hash, "
                    "anchor_mac = :mac WHERE tenant_id = :t"
                ),
                {
                    "t": tenant_id,
                    "first": seq + 1,
                    "hash": hash_,
                    "mac": mac(anchor_message(tenant_id, seq + 1, hash_)),
                },
            )
        for name in old:
            connection.exec_driver_sql(
                f'ALTER TABLE {events} DETACH PARTITION "{db.schema}"."{name}"'
            )
            connection.exec_driver_sql(f'DROP TABLE "{db.schema}"."{name}"')
    return PruneReport(False, old, int(count), verified)


def _verify_before_cutting(
    db: OperatorDatabase,
    cut: set[str],
    check_mac: MacCheck | None,
    expected_heads: Mapping[str, Head] | None,
) -> int:
    """Verify the chains of ``cut`` and of every kept head (in a snapshot of its own,
    taken while the caller holds the months to drop); raise on any break. Returns how
    many chains it verified."""
    tenants = sorted(cut | set(expected_heads or {}))
    report = verify_audit(db, tenants, check_mac=check_mac, expected_heads=expected_heads)
    if report.ok:
        return len(tenants)
    first = report.breaks[0]
    raise AuditChainBroken(
        f"audit prune refused: {len(report.breaks)} breaks in the chains of tenants "
        f"{', '.join(report.broken_tenants)} (first: tenant {first.tenant_id} seq "
        f"{first.seq}: {first.problem}); nothing dropped and no start marker signed "
        "(audit verify names every break)",
        report.breaks,
    )
