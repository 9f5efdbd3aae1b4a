"""KEK rotation: a new transit key version, then every wrapped DEK rewrapped under it.

O(tenants) work: the DEKs themselves do not change, so no sealed value is touched
and no cache goes stale. Rewrapping goes in batches (the key provider's batch
calls, a few hundred keys per request), each batch one transaction whose rows are
locked with ``SKIP LOCKED``, so several processes share the work and a writer
adding a tenant's first key never waits.

A run rotates the transit key only when every wrapped DEK is already at its
latest version; otherwise it finishes the rewrap a previous run left behind, so
a rerun after a crash completes the job instead of rotating again. The decision
is made under an advisory lock, so two runs started together rotate once.

Raising ``min_decryption_version`` makes older KEK versions unusable for good
(and, with them, every wrapped DEK in older backups). It is refused unless a
count shows no wrapped DEK still needs an older version; the count is repeated
after raising it, and the raise undone if a straggler appeared in between.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from tenantvault import audit
from tenantvault.db.models import AuditAction
from tenantvault.db.operator import KEK_ROTATION_LOCK, OperatorDatabase
from tenantvault.errors import RotationError
from tenantvault.kms.provider import KeyProvider


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


def _behind(connection: sa.Connection, keys: str, latest: int) -> int:
    return int(
        connection.execute(
            sa.text(f"SELECT count(*) FROM {keys} WHERE state <> 'destroyed' AND kek_version < :v"),
            {"v": latest},
        ).scalar_one()
    )


def rotate_kek(
    db: OperatorDatabase,
    provider: KeyProvider,
    *,
    rotate: bool = True,
    raise_min_decryption_version: bool = False,
    dry_run: bool = False,
    batch_size: int = 1000,
    stop: threading.Event | None = None,
    on_progress: Callable[[KekProgress], None] | None = None,
) -> KekRotationReport:
    """Rotate the transit key (unless ``rotate`` is False: catch up only) and rewrap.

    Args:
        db: the operator's database (the migration owner's login).
        provider: the key provider (Vault transit in production).
        rotate: make a new KEK version first (when nothing is left to rewrap).
        raise_min_decryption_version: afterwards, forbid unwrapping with older versions.
        dry_run: report what would change; change nothing (not even Vault).
        batch_size: wrapped DEKs per transaction.
        stop: set it to stop after the current batch.
        on_progress: called after every committed batch.

    Raises:
        RotationError: ``min_decryption_version`` refused (a DEK still needs an old version).
        KeyProviderUnavailable: Vault could not be reached; nothing was half-written.
    """
    stop = stop or threading.Event()
    keys = db.table("tenant_data_keys")
    with db.transaction() as connection:
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:c, 0)"), {"c": KEK_ROTATION_LOCK})
        # Read under the lock: a run that just rotated is seen, and not rotated again.
        before = provider.kek_version()
        pending = _behind(connection, keys, before)
        will_rotate = rotate and pending == 0
        if will_rotate and not dry_run:
            provider.rotate_kek()
    latest = provider.kek_version()
    if dry_run:
        target = before + 1 if will_rotate else before
        with db.transaction() as connection:
            behind = _behind(connection, keys, target)
        return KekRotationReport(True, before, target, will_rotate, behind=behind)

    report = KekRotationReport(False, before, latest, will_rotate)
    with db.transaction() as connection:
        total = _behind(connection, keys, latest)
    select = (
        f"SELECT tenant_id, version, wrapped_key FROM {keys} "
        "WHERE state <> 'destroyed' AND kek_version < :latest AND (tenant_id, version) > (:t, :v) "
        "ORDER BY tenant_id, version LIMIT :n FOR UPDATE"
    )
    update = sa.text(
        f"UPDATE {keys} AS k SET wrapped_key = v.new_key, kek_version = v.kek_version "
        "FROM unnest(CAST(:tenants AS text[]), CAST(:versions AS int[]), "
        "CAST(:old AS text[]), CAST(:new AS text[]), CAST(:keks AS int[])) "
        "AS v(tenant_id, version, old_key, new_key, kek_version) "
        "WHERE k.tenant_id = v.tenant_id AND k.version = v.version AND k.wrapped_key = v.old_key"
    )

    def one_pass(lock: str) -> None:
        """Rewrap every key still behind, from the first; failed ones are passed over."""
        cursor: dict[str, Any] = {"t": "", "v": 0}
        while not stop.is_set():
            with db.transaction() as connection:
                rows = connection.execute(
                    sa.text(select + lock), {"latest": latest, "n": batch_size, **cursor}
                ).all()
                if not rows:
                    return
                cursor = {"t": rows[-1].tenant_id, "v": rows[-1].version}
                results = provider.rewrap([(row.tenant_id, row.wrapped_key) for row in rows])
                done: dict[str, list[Any]] = {
                    k: [] for k in ("tenants", "versions", "old", "new", "keks")
                }
                for row, result in zip(rows, results, strict=True):
                    if result.wrapped is None:
                        report.failures.append(
                            RewrapFailure(row.tenant_id, row.version, result.error or "refused")
                        )
                        continue
                    done["tenants"].append(row.tenant_id)
                    done["versions"].append(row.version)
                    done["old"].append(row.wrapped_key)
                    done["new"].append(result.wrapped.ciphertext)
                    done["keks"].append(result.wrapped.kek_version)
                if done["new"]:
                    report.rewrapped += connection.execute(update, done).rowcount
                    audit.record_many(
                        connection,
                        (
                            audit.Event(
                                tenant,
                                AuditAction.KEK_REWRAPPED,
                                actor="rotate-keys",
                                target_type="dek",
                                target_id=str(version),
                                details={"kek_version": kek},
                            )
                            for tenant, version, kek in zip(
                                done["tenants"], done["versions"], done["keks"], strict=True
                            )
                        ),
                    )
            if on_progress is not None:
                on_progress(KekProgress(report.rewrapped, total))

    # First pass: rows another run (or a writer) holds are skipped, so runs share the
    # work. Second pass: wait for what was held; a key another run rewrapped meanwhile
    # no longer matches when its lock is released, a key a writer held is rewrapped.
    one_pass(" SKIP LOCKED")
    one_pass("")
    # The second pass meets the first pass's failures again: report each key once.
    report.failures = list(dict.fromkeys(report.failures))
    if stop.is_set():
        report.stopped = "interrupted: stopped after the current batch"

    with db.transaction() as connection:
        report.behind = _behind(connection, keys, latest)
    if raise_min_decryption_version and report.stopped is None:
        report.min_decryption_version = _raise_min(db, provider, keys, latest, report)
    return report


def _raise_min(
    db: OperatorDatabase, provider: KeyProvider, keys: str, latest: int, report: KekRotationReport
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
    with db.transaction() as connection:
        stragglers = _behind(connection, keys, latest)
    if stragglers:
        provider.set_min_decryption_version(previous)
        raise RotationError(
            f"min_decryption_version put back to {previous}: {stragglers} data keys were "
            "wrapped with an older KEK version meanwhile; rerun rotate-keys kek --no-rotate"
        )
    return latest
