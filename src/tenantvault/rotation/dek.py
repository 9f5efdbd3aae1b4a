"""DEK rotation: give a tenant a new data key and re-seal everything it protects.

Per tenant, claimed by one process at a time (an advisory lock; other processes
take other tenants):

1. **switch**: a new key version becomes active and the old one ``draining``, in
   one transaction holding the tenant's key lock exclusively — writers that read
   the old key have committed, later writers seal with the new one. A tenant that
   already has a draining key is resumed instead (a run that stopped midway).
2. **re-seal**: each sealed column is paged through in batches, each its own
   transaction: rows naming an older key are read, opened, sealed with the active
   key, and written back with a compare-and-swap — only where the value is still
   the one read, so nothing a writer stored meanwhile is overwritten. A value that
   does not open is reported by place, never content, and left as it is.
3. **retire**: holding the key lock again, count what still names an older key;
   at zero the draining keys become ``retired``. Otherwise (a writer raced in)
   re-seal again, a bounded number of times.

A crash at any point leaves every value readable: old keys stay readable until
retired, and a value is replaced only by its re-sealed self. A rerun resumes.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import psycopg
import psycopg.types.json
import sqlalchemy as sa

from tenantvault.crypto.envelope import like_patterns, sql_is_current
from tenantvault.db.operator import DEK_ROTATION_CLAIM, OperatorDatabase
from tenantvault.db.session import check_tenant_id
from tenantvault.errors import (
    DecryptionError,
    KeyDestroyedError,
    KeyProviderError,
    TenantKeyUnavailable,
    TenantVaultError,
)
from tenantvault.keys import store
from tenantvault.keys.keyring import Keyring, NewKey, Sealer
from tenantvault.keys.legacy import OPENS_FUNCTION, sql_opens
from tenantvault.keys.sealed import CONFIG_TABLE, SEALED_COLUMNS, SealedColumn, config_digest
from tenantvault.metrics import default_metrics
from tenantvault.rotation.lookahead import Lookahead
from tenantvault.rotation.options import DekRotationOptions
from tenantvault.rotation.status import close_legacy_formats_when_none_left
from tenantvault.rotation.writer import Writer

RESEAL_PASSES = 3
# A batch's values go back in chunks: each chunk's UPDATE runs while the next chunk is
# re-sealed. Smaller chunks overlap more and cost more statements. The database's
# part is the longer one (about 3.8 ms per 250 values, the re-sealing 2.5 ms), so the
# first chunk is small: the UPDATEs start sooner.
RESEAL_CHUNK = 250
FIRST_CHUNK = 50
_AFTER = "/* after the last row */"  # where a page's keyset condition goes
ACTOR = "rotate-keys"
# Why an older-format value is left as it is: the database does not let it open.
NOT_RECORDED = "older format not recorded at the upgrade, or beside another config now"


_JSON = json.JSONDecoder()


def _json_loads(data: str | bytes) -> Any:
    # The server sends UTF-8: json.loads on bytes would detect the encoding first, as
    # long again as the decoding for a small config (one per credentials row re-sealed).
    return _JSON.decode(data if isinstance(data, str) else data.decode())


def _cursor(connection: sa.Connection) -> psycopg.Cursor[Any]:
    """A binary-format cursor on the connection's own driver connection (same
    transaction): batches of text arrays go out and come back without text quoting."""
    driver = connection.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    cursor = driver.cursor(binary=True)
    psycopg.types.json.set_json_loads(_json_loads, cursor)
    return cursor


def _chunks(count: int) -> list[tuple[int, int]]:
    """Where a batch of ``count`` values is cut: a small first chunk, then full ones."""
    bounds = [0, *range(min(FIRST_CHUNK, count), count, RESEAL_CHUNK), count]
    return [(start, end) for start, end in pairwise(bounds) if end > start]


@dataclass(frozen=True)
class Unopenable:
    """A sealed value that would not open: where it is, and the error's class, never content."""

    tenant_id: str
    column: str
    row: str
    error: str


DONE = frozenset(
    {"rotated", "resumed", "resealed", "no keys", "would rotate", "would resume", "would reseal"}
)


@dataclass
class TenantRotation:
    """What happened (or, in a dry run, would happen) to one tenant."""

    tenant_id: str
    # rotated | resumed | resealed | no keys | busy | incomplete | keys changed
    # | kek unavailable | would rotate | would resume | would reseal
    outcome: str
    from_version: int | None = None
    to_version: int | None = None
    resealed: dict[str, int] = field(default_factory=dict)
    retired: list[int] = field(default_factory=list)
    remaining: int = 0  # values still naming an older key afterwards
    reason: str = ""  # why a tenant was skipped (its own KEK unavailable), no secrets

    @property
    def done(self) -> bool:
        return self.outcome in DONE


@dataclass(frozen=True)
class Progress:
    """One committed batch (``column`` set) or one finished tenant (``finished`` set)."""

    tenant_id: str
    column: str | None
    rows: int
    tenants_done: int
    tenants_total: int
    finished: TenantRotation | None = None


@dataclass
class DekRotationReport:
    dry_run: bool
    tenants: list[TenantRotation] = field(default_factory=list)
    unopenable: list[Unopenable] = field(default_factory=list)
    stopped: str | None = None  # why the run ended before finishing every tenant
    # After a whole run over every tenant: whether the database's switch for older
    # formats is closed (none left anywhere); None when the run did not look.
    legacy_closed: bool | None = None

    @property
    def resealed(self) -> int:
        return sum(sum(t.resealed.values()) for t in self.tenants)

    @property
    def ok(self) -> bool:
        return self.stopped is None and not self.unopenable and all(t.done for t in self.tenants)


class _Stopped(Exception):  # noqa: N818 - internal control flow, never escapes
    pass


class _KeysChanged(Exception):  # noqa: N818 - internal control flow, never escapes
    """The tenant's active key is no longer the rotation's target."""


class DekRotation:
    """Rotates tenants' data keys; one instance per run, shared by its worker threads."""

    def __init__(
        self,
        db: OperatorDatabase,
        keyring: Keyring,
        options: DekRotationOptions,
        *,
        stop: threading.Event | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.db = db
        self.keyring = keyring
        self.options = options
        self.stop = stop or threading.Event()
        self.on_progress = on_progress
        self.report = DekRotationReport(dry_run=options.dry_run)
        self._lock = threading.Lock()
        self._total = 0
        self._destroyed: dict[str, list[str]] = {}  # per tenant: LIKE patterns of its keys

    # --- the run ---

    def run(self, tenants: Sequence[str] | None = None) -> DekRotationReport:
        """Rotate ``tenants`` (every tenant with a key when None). A whole run over every
        tenant that leaves no value in an older format closes the database's switch."""
        every_tenant = tenants is None
        if tenants is None:
            with self.db.transaction() as connection:
                tenants = store.tenants_with_keys(connection)
        queue = Lookahead(
            # A tenant named twice is rotated once (twice, it would find itself busy).
            list(dict.fromkeys(check_tenant_id(t) for t in tenants)),
            self.keyring,
            self.db.transaction,
            new_keys=self.options.new_key and not self.options.dry_run,
            warm=not self.options.dry_run,
        )
        self._total = len(queue)
        threads = [
            threading.Thread(target=self._work, args=(queue,), name=f"rotate-dek-{n}")
            for n in range(min(self.options.workers, max(1, len(queue))))
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            queue.close()
        if len(self.report.tenants) < self._total:
            with self._lock:  # e.g. stopped between two tenants: the run is not whole
                if self.report.stopped is None:
                    self.report.stopped = "interrupted: stopped between two tenants"
        self.report.tenants.sort(key=lambda t: t.tenant_id)
        if every_tenant and not self.options.dry_run and self.report.ok:
            self.report.legacy_closed = close_legacy_formats_when_none_left(self.db)
        return self.report

    def _work(self, queue: Lookahead) -> None:
        while not self.stop.is_set():
            try:
                taken = queue.take()
            except Exception as exc:  # nothing of a tenant was done yet
                self._stop_run(f"taking the next tenant: {type(exc).__name__}")
                return
            if taken is None:
                return
            tenant_id, new_key = taken
            try:
                result = self._tenant(tenant_id, new_key)
                with self._lock:
                    self.report.tenants.append(result)
                    done = len(self.report.tenants)
                rows = sum(result.resealed.values())
                self._progress(Progress(tenant_id, None, rows, done, self._total, result))
            except _Stopped:
                return
            except TenantKeyUnavailable as exc:
                # The tenant's own KEK (a customer's key) is revoked or unreachable: that
                # tenant is skipped, with why; the others rotate on.
                result = TenantRotation(tenant_id, "kek unavailable", reason=str(exc))
                with self._lock:
                    self.report.tenants.append(result)
                    done = len(self.report.tenants)
                self._progress(Progress(tenant_id, None, 0, done, self._total, result))
            except KeyProviderError as exc:
                self._stop_run(f"key provider failed for tenant {tenant_id}: {exc}")
                return
            except TenantVaultError as exc:
                self._stop_run(f"tenant {tenant_id}: {exc}")
                return
            except Exception as exc:
                # A worker thread must not die quietly (a failing progress callback
                # included): stop the run and say so. Only the class: a database
                # error's text may carry statement parameters.
                self._stop_run(f"tenant {tenant_id}: {type(exc).__name__}; nothing half-written")
                return

    def _stop_run(self, why: str) -> None:
        with self._lock:
            if self.report.stopped is None:
                self.report.stopped = why
        self.stop.set()

    def _progress(self, event: Progress) -> None:
        if event.finished is None:
            default_metrics().rotated("dek", event.rows)
        else:
            default_metrics().rotation_tenant_done(event.finished.outcome)
        if self.on_progress is not None:
            self.on_progress(event)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            with self._lock:
                if self.report.stopped is None:
                    self.report.stopped = "interrupted: stopped after the current batch"
            raise _Stopped

    # --- one tenant ---

    def _tenant(self, tenant_id: str, new_key: NewKey | None = None) -> TenantRotation:
        """Rotate one tenant; ``new_key`` is its new key if the provider was asked ahead."""
        with self.db.claim(DEK_ROTATION_CLAIM, tenant_id) as claimed:
            if not claimed:
                return TenantRotation(tenant_id, "busy")
            with self.db.transaction() as connection:
                keys = store.states(connection, tenant_id)
                active, draining = keys.active, keys.draining
                # Values under a destroyed (shredded) key are gone for good: never stale.
                self._destroyed[tenant_id] = like_patterns(keys.destroyed)
                if active is None:
                    return TenantRotation(tenant_id, "no keys")
                # A new key makes every value stale; a resumed rotation only those not
                # yet re-sealed; re-sealing alone, those in the old format. Counted
                # before the switch: a value a writer seals under the old key after the
                # count is found by the retirement's recount, and re-sealed then.
                switching = not draining and self.options.new_key
                stale, _ = self._stale_counts(
                    connection, tenant_id, [active] if switching else draining
                )
            if self.options.dry_run:
                return self._plan(tenant_id, active, draining, stale)
            if draining:
                result = TenantRotation(tenant_id, "resumed", min(draining), active)
                target = active
            elif not switching:
                result = TenantRotation(tenant_id, "resealed", active, active)
                target = active
            else:
                target = self.keyring.switch(
                    self.db.transaction, tenant_id, active, ACTOR, new_key=new_key
                )
                result = TenantRotation(tenant_id, "rotated", active, target)
                draining = [active]
            try:
                self._drain(tenant_id, target, draining, stale, result)
            except _KeysChanged:
                # Not by another rotation (the claim excludes it), nor by shred (it takes
                # the claim too): someone changed the keys by hand. Stop this tenant.
                result.outcome = "keys changed"
            return result

    def _drain(
        self,
        tenant_id: str,
        target: int,
        draining: list[int],
        stale: dict[SealedColumn, int],
        result: TenantRotation,
    ) -> None:
        """Re-seal what the draining keys protect under ``target`` (``stale`` counts it
        per column), then retire them."""
        for _ in range(RESEAL_PASSES):
            uncounted = 0  # seals of each column's last batch, counted by the retirement
            try:
                for column in SEALED_COLUMNS:
                    if not stale[column]:
                        continue
                    done, seals = self._reseal(tenant_id, column, target, draining)
                    uncounted += seals
                    if done:
                        result.resealed[column.name] = result.resealed.get(column.name, 0) + done
                try:
                    stale, retired = self._retire(tenant_id, target, draining, uncounted)
                except _KeysChanged:
                    uncounted = 0  # raised after the retirement's commit, which counted them
                    raise
                uncounted = 0
            finally:
                if uncounted:  # a stop or a failure before the retirement: count them now
                    self._count_seals(tenant_id, target, uncounted)
            remaining = sum(stale.values())
            result.remaining, result.retired = remaining, result.retired + retired
            if remaining <= self._unopenable_count(tenant_id):
                break
        if result.remaining:
            result.outcome = "incomplete"

    def _count_seals(self, tenant_id: str, version: int, seals: int) -> None:
        """Count ``seals`` against the key in a transaction of their own; if the database
        fails too, they stay uncounted, as after a crash (the error on its way out is
        the one to report)."""
        with contextlib.suppress(Exception), self.db.transaction() as connection:
            store.count_seals(connection, tenant_id, version, seals)

    def _check_target(self, connection: sa.Connection, tenant_id: str, target: int) -> None:
        """Hold the tenant's key lock (shared) for the transaction, and stop unless
        ``target`` is still the active key: nothing is re-sealed under a key that was
        destroyed or superseded meanwhile."""
        store.lock_tenant_keys(connection, tenant_id, exclusive=False)
        found = store.active(connection, tenant_id)
        if found is None or found.version != target:
            raise _KeysChanged

    def _plan(
        self, tenant_id: str, active: int, draining: list[int], stale: dict[SealedColumn, int]
    ) -> TenantRotation:
        """What a real run would do: which key versions, and how many values per column."""
        if draining or not self.options.new_key:
            outcome = "would resume" if draining else "would reseal"
            result = TenantRotation(tenant_id, outcome, min(draining, default=active), active)
            result.retired = list(draining)
        else:
            result = TenantRotation(tenant_id, "would rotate", active, active + 1, retired=[active])
        result.resealed = {column.name: count for column, count in stale.items() if count}
        return result

    @staticmethod
    def _draining_where(column: SealedColumn) -> str:
        # Values under the draining keys: never one a writer sealed under a newer key,
        # and never one under a destroyed key (gone for good, not stale).
        return f"t.tenant_id = %(t)s AND t.{column.column} LIKE ANY(%(draining)s::text[])"

    @classmethod
    def _stale_where(cls, column: SealedColumn) -> str:
        # What to re-seal: values under the draining keys, and values in the old format
        # (under any key; a malformed value too, to be reported by row).
        name = f"t.{column.column}"
        return (
            f"{cls._draining_where(column)} OR (t.tenant_id = %(t)s AND {name} IS NOT NULL "
            f"AND NOT {sql_is_current(name)} AND NOT {name} LIKE ANY(%(destroyed)s::text[]))"
        )

    def _stale_counts(
        self, connection: sa.Connection, tenant_id: str, draining: list[int]
    ) -> tuple[dict[SealedColumn, int], dict[SealedColumn, int]]:
        """How many values of each sealed column of the tenant are to be re-sealed, and
        of those how many are under a draining key (they keep it from retiring), in one
        statement for all columns, one pass over each table."""
        sql = " UNION ALL ".join(
            f"SELECT {index}, count(*), count(*) FILTER (WHERE {self._draining_where(column)}) "
            f"FROM {self.db.table(column.table)} t WHERE {self._stale_where(column)}"
            for index, column in enumerate(SEALED_COLUMNS)
        )
        params = {
            "t": tenant_id,
            "draining": like_patterns(draining),
            "destroyed": self._destroyed.get(tenant_id, []),
        }
        with _cursor(connection) as cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall()
        stale = {SEALED_COLUMNS[index]: int(count) for index, count, _ in rows}
        blocking = {SEALED_COLUMNS[index]: int(count) for index, _, count in rows}
        return stale, blocking

    def _reseal(
        self, tenant_id: str, column: SealedColumn, target: int, draining: list[int]
    ) -> tuple[int, int]:
        """Re-seal one column of one tenant in batches; returns how many values moved,
        and how many seals its last batch made (the caller counts those).

        Each batch is one transaction and a compare-and-swap: a row is written only
        if it still holds the value that was read, so a value a writer stored in
        between (already under the new key) is never overwritten with a stale one.
        Cheaper than locking the rows first, which would write every row twice."""
        names = [name for name, _ in column.keys]
        key_list = ", ".join(names)
        row_keys = ", ".join(f"t.{name}" for name in names)
        table = self.db.table(column.table)
        after = ", ".join(f"%(k{i})s::{sql_type}" for i, (_, sql_type) in enumerate(column.keys))
        # What each value is bound to, its config's among it (joined where the row is not
        # the config): read with the value, so the re-seal binds it to the same.
        bound = "".join(f", {expression}" for expression in column.bound_to)
        join = (
            ""
            if column.config_join is None
            else f" JOIN {self.db.table(CONFIG_TABLE)} c ON {column.config_join}"
        )
        # And the database's answer for an older-format value (keys/legacy.py): one it
        # did not record at the upgrade, or beside another config now, is reported, not
        # re-sealed into the current binding.
        value = f"t.{column.column}"
        allowed = (
            f"CASE WHEN {sql_is_current(value)} THEN true "
            f"ELSE {sql_opens(column, self.db.table(OPENS_FUNCTION))} END"
        )
        select = (
            f"SELECT {row_keys}{bound}, {column.config}, {allowed}, {value} FROM {table} t{join} "
            f"WHERE ({self._stale_where(column)}) {_AFTER} "
            f"ORDER BY {row_keys} LIMIT %(n)s"
        )
        arrays = ", ".join(f"%(a{i})b::{sql_type}[]" for i, (_, sql_type) in enumerate(column.keys))
        matches = " AND ".join(f"t.{name} = v.{name}" for name in names)
        update = (
            f"UPDATE {table} AS t SET {column.column} = v.new_value "
            f"FROM unnest({arrays}, %(old)b::text[], %(new)b::text[]) "
            f"AS v({key_list}, old_value, new_value) "
            f"WHERE t.tenant_id = %(t)s AND {matches} AND t.{column.column} = v.old_value"
        )
        params: dict[str, Any] = {
            "t": tenant_id,
            "n": self.options.batch_size,
            "draining": like_patterns(draining),
            "destroyed": self._destroyed.get(tenant_id, []),
        }
        width = len(names)
        where_after = ""
        moved = 0
        while True:
            self._check_stop()
            with self.db.transaction() as connection, _cursor(connection) as cursor:
                self._check_target(connection, tenant_id, target)
                cursor.execute(select.replace(_AFTER, where_after), params)
                rows = cursor.fetchall()
                if not rows:
                    return moved, 0
                where_after = f"AND ({row_keys}) > ({after})"
                params.update({f"k{i}": value for i, value in enumerate(rows[-1][:width])})
                sealer = self.keyring.sealer(connection, tenant_id, active_version=target)
                sent = 0
                with Writer(cursor.connection) as writer:
                    for start, end in _chunks(len(rows)):
                        chunk = rows[start:end]
                        resealed = self._reseal_rows(sealer, column, chunk, width)
                        if resealed[-1]:
                            batch: dict[str, Any] = {
                                f"a{i}": values for i, values in enumerate(resealed[:width])
                            }
                            batch.update(old=resealed[width], new=resealed[width + 1], t=tenant_id)
                            writer.send(update, batch)
                            sent += len(resealed[-1])
                    moved += writer.close()
                seals = sealer.take_seals()
            last_batch = len(rows) < self.options.batch_size
            if not last_batch:
                # Counted after the batch commits, in a transaction of its own: the
                # batch's row locks and a writer's lock on the key row are never held at
                # once (a deadlock). A crash in between leaves this batch uncounted.
                with self.db.transaction() as connection:
                    store.count_seals(connection, tenant_id, target, seals)
            with self._lock:
                done_tenants = len(self.report.tenants)
            try:
                self._progress(Progress(tenant_id, column.name, sent, done_tenants, self._total))
            except BaseException:
                if last_batch:  # the retirement will not count them: the run stops
                    self._count_seals(tenant_id, target, seals)
                raise
            if last_batch:
                # A short page was the last one: no empty query to confirm it. Its seals
                # are counted by the retirement's transaction, which follows.
                return moved, seals

    def _reseal_rows(
        self, sealer: Sealer, column: SealedColumn, rows: Sequence[Sequence[Any]], width: int
    ) -> list[list[Any]]:
        """Re-seal each value under the sealer's key: one list per key column, then the
        old values, then the new ones. A value that does not open is reported and
        left out."""
        out: list[list[Any]] = [[] for _ in range(width + 2)]
        tenant_id = sealer.tenant_id
        reseal = sealer.resealer(column.table, column.column)
        for row in rows:
            sealed = row[-1]
            row_id = column.row_id(*row[:width])
            *bound, config, allowed = row[width:-1]
            digest = config_digest(config)
            if not allowed:
                self._unopenable(Unopenable(tenant_id, column.name, row_id, NOT_RECORDED))
                continue
            try:
                resealed = reseal(
                    sealed,
                    row_id,
                    column.binding(*bound, digest),
                    column.legacy_binding(*bound, digest),
                )
            except (DecryptionError, KeyDestroyedError) as exc:
                self._unopenable(Unopenable(tenant_id, column.name, row_id, type(exc).__name__))
                continue
            for index in range(width):
                out[index].append(row[index])
            out[width].append(sealed)
            out[width + 1].append(resealed)
        return out

    def _retire(
        self, tenant_id: str, active: int, draining: list[int], seals: int
    ) -> tuple[dict[SealedColumn, int], list[int]]:
        """Count what still names a draining key; at zero, retire the draining keys.
        The count and the retirement are one transaction under the exclusive key lock,
        which also counts ``seals`` (made under ``active`` by batches not counted yet):
        no writer holds the key row then, so no deadlock with one."""
        with self.db.transaction() as connection:
            store.lock_tenant_keys(connection, tenant_id, exclusive=True)
            store.count_seals(connection, tenant_id, active, seals)
            found = store.active(connection, tenant_id)
            if found is not None and found.version == active:
                stale, blocking = self._stale_counts(connection, tenant_id, draining)
                if any(blocking.values()):
                    return stale, []
                return stale, store.retire_draining(connection, tenant_id, active, actor=ACTOR)
        raise _KeysChanged  # after the commit: the seals made are counted all the same

    def _unopenable(self, item: Unopenable) -> None:
        with self._lock:
            if item not in self.report.unopenable:
                self.report.unopenable.append(item)

    def _unopenable_count(self, tenant_id: str) -> int:
        with self._lock:
            return sum(1 for item in self.report.unopenable if item.tenant_id == tenant_id)


def rotate_data_keys(
    db: OperatorDatabase,
    keyring: Keyring,
    tenants: Sequence[str] | None = None,
    options: DekRotationOptions | None = None,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> DekRotationReport:
    """Rotate the data keys of ``tenants`` (every tenant with a key when None).

    Args:
        db: the operator's database (the migration owner's login).
        keyring: the key provider and a cache for the keys the run opens and makes.
        tenants: tenant ids; a tenant without keys is reported as "no keys".
        options: workers, batch size, dry run (the defaults when None).
        stop: set it (e.g. on Ctrl-C) to stop after the current batch.
        on_progress: called after every committed batch and finished tenant.

    Returns:
        The report; ``ok`` is False if a value did not open, a tenant was busy or
        incomplete, or the run stopped early (``stopped`` says why).
    """
    rotation = DekRotation(
        db, keyring, options or DekRotationOptions(), stop=stop, on_progress=on_progress
    )
    return rotation.run(tenants)
