"""KEK rotation: a new transit key version, then every wrapped DEK rewrapped under it.

O(tenants) work: the DEKs themselves do not change, so no sealed value is touched
and no cache goes stale. Rewrapping goes in batches (the key provider's batch
calls, a few hundred keys per request), each batch one transaction whose rows are
locked with ``SKIP LOCKED``, so several processes share the work and a writer
adding a tenant's first key never waits. Each stored key gets its ``kek.rewrapped``
event in the statement that stores it.

The transit calls and the database take turns otherwise, so they overlap: while a
batch is stored, the next one is already locked (in a transaction of its own) and
its rewrap is on its way to transit. Transit's time and the database's are each
about half of a batch; overlapped, a batch costs the longer of the two.

A run rotates the transit key only when every wrapped DEK is already at its
latest version; otherwise it finishes the rewrap a previous run left behind, so
a rerun after a crash completes the job instead of rotating again. The decision
is made under a claim (db/operator.py), so two runs started together rotate once.

Raising ``min_decryption_version`` makes older KEK versions unusable for good
(and, with them, every wrapped DEK in older backups). It is refused unless a
count shows no wrapped DEK still needs an older version; the count is repeated
after raising it, and the raise undone if a straggler appeared in between.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field

from tenantvault.db.operator import KEK_ROTATION_CLAIM, OperatorDatabase
from tenantvault.errors import RotationError
from tenantvault.keys import store
from tenantvault.kms.provider import KeyProvider, RewrapResult
from tenantvault.metrics import default_metrics
from tenantvault.rotation.options import KekRotationOptions

ACTOR = "rotate-keys"


@dataclass(frozen=True)
class RewrapFailure:
    tenant_id: str
    dek_version: int
    error: str


@dataclass
class KekRotationReport:
    dry_run: bool
    kek_before: int
    kek_after: int
    rotated: bool
    rewrapped: int = 0
    behind: int = 0  # wrapped DEKs still under an older KEK version at the end
    min_decryption_version: int | None = None
    failures: list[RewrapFailure] = field(default_factory=list)
    stopped: str | None = None

    @property
    def ok(self) -> bool:
        return self.stopped is None and not self.failures and (self.dry_run or self.behind == 0)


@dataclass(frozen=True)
class KekProgress:
    rewrapped: int
    total: int


class _RolledBackError(Exception):
    """Ends a batch's transaction without storing anything."""


class _Batch:
    """Keys locked by a transaction of their own that stays open until they are stored,
    and their rewrap, sent to transit meanwhile."""

    def __init__(self, db: OperatorDatabase) -> None:
        self._transaction = ExitStack()
        self.connection = self._transaction.enter_context(db.transaction())
        self.rows: list[tuple[str, int, str]] = []
        self.rewrapped: Future[list[RewrapResult]] = Future()

    def commit(self) -> None:
        self._transaction.close()  # after this, roll_back does nothing

    def roll_back(self) -> None:
        self._transaction.__exit__(_RolledBackError, _RolledBackError(), None)


def _behind(db: OperatorDatabase, kek_ref: str, latest: int) -> int:
    with db.transaction() as connection:
        return store.count_behind_kek(connection, kek_ref, latest)


def rotate_kek(
    db: OperatorDatabase,
    provider: KeyProvider,
    options: KekRotationOptions | None = None,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[KekProgress], None] | None = None,
) -> KekRotationReport:
    """Rotate the transit key (unless ``options.rotate`` is False: catch up only) and rewrap.

    Args:
        db: the operator's database (the migration owner's login).
        provider: the key provider (Vault transit in production).
        options: rotate or only catch up, raise min_decryption_version, dry run,
            batch size (the defaults when None).
        stop: set it to stop after the current batch.
        on_progress: called after every committed batch.

    Raises:
        RotationError: ``min_decryption_version`` refused (a DEK still needs an old version).
        KeyProviderUnavailable: transit could not be reached; nothing was half-written.
    """
    options = options or KekRotationOptions()
    stop = stop or threading.Event()
    # Waits for another run's decision (up to the statement timeout); the application's
    # login cannot take or hold this claim (db/operator.py).
    with db.claim(KEK_ROTATION_CLAIM, "", wait=True) as claimed:
        if not claimed:  # only a claims row committed by hand stands in the way
            raise RotationError("the KEK rotation claim is held: nothing was rotated")
        with db.transaction() as connection:
            # Read under the claim: a run that just rotated is seen, and not rotated again.
            before = provider.kek_version()
            pending = store.count_behind_kek(connection, provider.ref, before)
            will_rotate = options.rotate and pending == 0
            if will_rotate and not options.dry_run:
                provider.rotate_kek()
    latest = provider.kek_version()
    if options.dry_run:
        target = before + 1 if will_rotate else before
        return KekRotationReport(
            True, before, target, will_rotate, behind=_behind(db, provider.ref, target)
        )

    report = KekRotationReport(False, before, latest, will_rotate)
    total = _behind(db, provider.ref, latest)
    reporting = threading.Lock()  # workers add to the report and call on_progress
    halt = threading.Event()  # a worker failed: the others stop after their batch

    def lock_and_send(
        transit: ThreadPoolExecutor, after: tuple[str, int], skip_locked: bool
    ) -> _Batch | None:
        """The next batch after ``after``, locked, its rewrap sent; None when none is left."""
        batch = _Batch(db)
        try:
            batch.rows = store.lock_behind_kek(
                batch.connection,
                provider.ref,
                latest,
                after=after,
                limit=options.batch_size,
                skip_locked=skip_locked,
            )
        except BaseException:
            batch.roll_back()
            raise
        if not batch.rows:
            batch.commit()
            return None
        items = [(tenant, wrapped) for tenant, _, wrapped in batch.rows]
        batch.rewrapped = transit.submit(provider.rewrap, items)
        return batch

    def store_batch(batch: _Batch) -> None:
        """Wait for the batch's rewrap, store it with its events, commit; failed keys
        are reported and left as they were."""
        done = []
        for (tenant, version, wrapped), result in zip(
            batch.rows, batch.rewrapped.result(), strict=True
        ):
            if result.wrapped is None:
                with reporting:
                    report.failures.append(
                        RewrapFailure(tenant, version, result.error or "refused")
                    )
                continue
            done.append(store.Rewrapped(tenant, version, wrapped, result.wrapped, provider.ref))
        stored = store.store_rewrapped(batch.connection, done, actor=ACTOR)
        batch.commit()
        default_metrics().rotated("kek", stored)
        with reporting:
            report.rewrapped += stored
            if on_progress is not None:
                on_progress(KekProgress(report.rewrapped, total))

    def one_pass(skip_locked: bool) -> None:
        """Rewrap every key still behind, from the first; failed ones are passed over.

        With ``skip_locked``, the next batch is locked and sent before the one before it
        is stored. Without, it is not: the next batch's lock may wait for a writer, and
        the batch before would hold its keys (and writers waiting for them) meanwhile."""
        ahead = 1 if skip_locked else 0
        after: tuple[str, int] = ("", 0)
        waiting: deque[_Batch] = deque()
        # One thread: transit's calls go one after another, as without the overlap.
        with ThreadPoolExecutor(1, thread_name_prefix="kek-rewrap") as transit:
            try:
                while not (stop.is_set() or halt.is_set()):
                    batch = lock_and_send(transit, after, skip_locked)
                    if batch is None:
                        break
                    after = batch.rows[-1][:2]
                    waiting.append(batch)
                    if len(waiting) > ahead:
                        store_batch(waiting[0])
                        waiting.popleft()
                # Stopped: the batch sent ahead is not stored; its keys stay as they were.
                while waiting and not (stop.is_set() or halt.is_set()):
                    store_batch(waiting[0])
                    waiting.popleft()
            finally:
                # Whatever was not committed (a failure, or a stop) rolls back.
                while waiting:
                    waiting.popleft().roll_back()

    # First pass: rows another run (or a writer) holds are skipped, so runs share the
    # work. Second pass: wait for what was held; a key another run rewrapped meanwhile
    # no longer matches when its lock is released, a key a writer held is rewrapped.
    _in_workers(options.workers, lambda: one_pass(skip_locked=True), halt)
    one_pass(skip_locked=False)
    # The second pass meets the first pass's failures again: report each key once.
    report.failures = list(dict.fromkeys(report.failures))
    if stop.is_set():
        report.stopped = "interrupted: stopped after the current batch"

    report.behind = _behind(db, provider.ref, latest)
    if options.raise_min_decryption_version and report.stopped is None:
        report.min_decryption_version = _raise_min(db, provider, latest, report)
    return report


def _in_workers(workers: int, work: Callable[[], None], halt: threading.Event) -> None:
    """``work`` in ``workers`` threads at once (here, when one); the first error is raised
    once every thread has ended, the others stopped by ``halt`` after their batch."""
    if workers == 1:
        work()
        return

    def guarded() -> None:
        try:
            work()
        except BaseException:
            halt.set()
            raise

    with ThreadPoolExecutor(workers, thread_name_prefix="kek-worker") as pool:
        running = [pool.submit(guarded) for _ in range(workers)]
    for done in running:
        done.result()


def _raise_min(
    db: OperatorDatabase, provider: KeyProvider, latest: int, report: KekRotationReport
) -> int:
    if report.behind:
        refused = ", ".join(f"{f.tenant_id} v{f.dek_version}" for f in report.failures[:5])
        more = f" and {len(report.failures) - 5} more" if len(report.failures) > 5 else ""
        why = f"rewrap refused for {refused}{more}" if refused else "another run holds them"
        raise RotationError(
            f"min_decryption_version not raised: {report.behind} wrapped data keys still need "
            f"a KEK version older than {latest} ({why}); rerun rotate-keys kek --no-rotate first"
        )
    previous = provider.min_decryption_version()
    provider.set_min_decryption_version(latest)
    stragglers = _behind(db, provider.ref, latest)
    if stragglers:
        provider.set_min_decryption_version(previous)
        raise RotationError(
            f"min_decryption_version put back to {previous}: {stragglers} data keys were "
            "wrapped with an older KEK version meanwhile; rerun rotate-keys kek --no-rotate"
        )
    return latest
