"""A tenant's own KEK (a customer-managed key): set it, move the tenant's keys under it.

``tenant-key set`` records the KEK in ``tenant_keks`` (from then on the tenant's new
data keys are wrapped by it) and then moves the tenant's existing data keys under
it online, a batch per transaction: each key is unwrapped by the KEK that wrapped
it and wrapped by the new one, stored by compare-and-swap with a ``kek.rewrapped``
event. ``unset`` does the same towards the deployment's KEK. A run stopped at any
point (SIGKILL included) leaves every key under one KEK or the other, its row saying
which; running it again finishes the move.

The move holds the tenant's key claim, as DEK rotation and shred do: the three
exclude each other. Only the tenant's data keys are re-wrapped; no sealed value
changes (they are sealed by the data keys, which stay the same).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tenantvault.db.operator import DEK_ROTATION_CLAIM, OperatorDatabase
from tenantvault.db.session import check_tenant_id
from tenantvault.errors import DecryptionError, KeyProviderError, RotationError
from tenantvault.keys import store
from tenantvault.keys.keyring import Keyring
from tenantvault.kms.keks import split_ref

ACTOR = "tenant-key"


@dataclass
class TenantKekReport:
    """What a ``tenant-key set``/``unset`` did: references and counts, never a key."""

    tenant_id: str
    kek_ref: str
    moved: int = 0
    left: int = 0
    failures: list[str] = field(default_factory=list)
    stopped: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures and self.stopped is None and self.left == 0


@dataclass(frozen=True)
class KekProgress:
    tenant_id: str
    moved: int


def move_tenant_keys(
    db: OperatorDatabase,
    keyring: Keyring,
    tenant_id: str,
    kek_ref: str | None,
    *,
    cache_max_age_seconds: int | None = None,
    batch_size: int = 100,
    stop: threading.Event | None = None,
    on_progress: Callable[[KekProgress], None] | None = None,
) -> TenantKekReport:
    """Make ``kek_ref`` the tenant's KEK (None: the deployment's again) and move its
    data keys under it.

    ``batch_size`` keys move per transaction (a tenant has a few; the bound keeps each
    transaction, which holds its keys' rows while the KMS answers, short).

    The KEK is checked before anything is written: it must exist, and this
    deployment's credentials must wrap and unwrap with it, for one tenant only (a
    transit key must be derived).

    Raises:
        InvalidInputError: ``kek_ref`` is not a key reference (names ``--key``).
        KeyProviderError: the KEK is not usable; nothing was written.
        RotationError: a DEK rotation or a shred of the tenant is running.
    """
    check_tenant_id(tenant_id)
    if cache_max_age_seconds is not None and kek_ref is None:
        raise ValueError("a cache age goes with a tenant's own KEK")
    if kek_ref is not None:
        split_ref(kek_ref)
    target = kek_ref or keyring.keks.default_ref
    keyring.keks.provider(target).check_usable()
    stop = stop or threading.Event()
    report = TenantKekReport(tenant_id, target)
    with db.claim(DEK_ROTATION_CLAIM, tenant_id) as claimed:
        if not claimed:
            raise RotationError(
                f"tenant {tenant_id} is being rotated or shredded: its KEK was not changed"
            )
        with db.transaction() as connection:
            store.set_tenant_kek(
                connection,
                tenant_id,
                kek_ref,
                cache_max_age_seconds=cache_max_age_seconds,
                actor=ACTOR,
            )
        while not stop.is_set():
            with db.transaction() as connection:
                rows = store.lock_not_under(connection, tenant_id, target, limit=batch_size)
                moved = []
                for version, wrapped, old_ref in rows:
                    try:
                        new = keyring.wrapped_anew(tenant_id, wrapped, old_ref, target)
                    except (KeyProviderError, DecryptionError) as exc:
                        report.failures.append(f"data key {version} (under {old_ref}): {exc}")
                        continue
                    moved.append(store.Rewrapped(tenant_id, version, wrapped, new, target))
                report.moved += store.store_rewrapped(connection, moved, actor=ACTOR)
            if on_progress is not None:
                on_progress(KekProgress(tenant_id, report.moved))
            if report.failures or not rows:
                break
        if stop.is_set():
            report.stopped = "interrupted: stopped after the current batch"
        with db.transaction() as connection:
            report.left = store.count_not_under(
                connection, keyring.keks.default_ref, [tenant_id]
            ).get(tenant_id, 0)
    # A process that cached a key under its old wrapping is not served it again: the
    # cache ties each key to the wrapping it came from, and a load reads the row's.
    return report


@dataclass(frozen=True)
class TenantKekStatus:
    """One tenant's KEK as ``tenant-key show`` reports it."""

    tenant_id: str
    kek_ref: str
    own: bool  # an operator set it (tenant_keks); False: the deployment's
    usable: bool
    reason: str  # why not usable ("" when it is)
    keys_elsewhere: int  # live data keys still under another KEK


def tenant_kek_status(
    db: OperatorDatabase, keyring: Keyring, tenants: Sequence[str] | None
) -> list[TenantKekStatus]:
    """Each of ``tenants`` (every tenant with its own KEK or keys to move when None):
    its KEK, a probe of it (once per KEK), and how many keys still sit elsewhere."""
    default = keyring.keks.default_ref
    with db.transaction() as connection:
        own = store.tenant_keks(connection, tenants)
        elsewhere = store.count_not_under(connection, default, tenants)
    listed = list(tenants) if tenants is not None else sorted(set(own) | set(elsewhere))
    probed: dict[str, str] = {}
    report = []
    for tenant_id in listed:
        ref = own.get(tenant_id, default)
        if ref not in probed:
            try:
                keyring.keks.provider(ref).check_usable()
                probed[ref] = ""
            except KeyProviderError as exc:
                probed[ref] = str(exc)
        report.append(
            TenantKekStatus(
                tenant_id,
                ref,
                tenant_id in own,
                not probed[ref],
                probed[ref],
                elsewhere.get(tenant_id, 0),
            )
        )
    return report
