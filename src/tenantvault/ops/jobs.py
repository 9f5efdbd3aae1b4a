"""Operator jobs from settings: what ``rotate-keys``, ``shred``, ``audit`` and ``purge``
call, one function each.

Each builds the operator's database and key provider from the settings, runs the
job, returns its report and closes what it opened — callable from a scheduler
or from application code as well as from the CLI.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta

from tenantvault.audit.chain import (
    AuditVerifyReport,
    Head,
    MacCheck,
    PruneReport,
    add_partitions,
    prune_audit,
    verify_audit,
)
from tenantvault.db.operator import OperatorDatabase
from tenantvault.keys.cache import DataKeyCache
from tenantvault.keys.keyring import Keyring
from tenantvault.kms.factory import kek_resolver, key_provider_from_settings
from tenantvault.kms.keks import Keks
from tenantvault.ops.purge import PurgeReport, purge_deleted_configs
from tenantvault.rotation.dek import DekRotationReport, Progress, rotate_data_keys
from tenantvault.rotation.kek import KekProgress, KekRotationReport, rotate_kek
from tenantvault.rotation.options import DekRotationOptions, KekRotationOptions
from tenantvault.rotation.shred import ShredReport, shred_tenant
from tenantvault.rotation.status import KeyStatusReport, key_status
from tenantvault.rotation.tenantkek import (
    KekProgress as TenantKekProgress,
)
from tenantvault.rotation.tenantkek import (
    TenantKekReport,
    TenantKekStatus,
    move_tenant_keys,
    tenant_kek_status,
)
from tenantvault.settings import Settings


@contextmanager
def _database(settings: Settings) -> Iterator[OperatorDatabase]:
    db = OperatorDatabase.from_settings(settings, pool_size=1)
    try:
        yield db
    finally:
        db.dispose()


@contextmanager
def _operator(
    settings: Settings, *, connections: int = 5
) -> Iterator[tuple[OperatorDatabase, Keyring]]:
    db = OperatorDatabase.from_settings(settings, pool_size=connections)
    # The run's own cache: keys of every tenant it touches, for as long as it runs.
    cache = DataKeyCache(
        max_age_seconds=settings.dek_cache_max_age_seconds,
        max_entries=max(settings.dek_cache_max_entries, 4 * connections),
        max_uses=10**12,
    )
    try:
        provider = key_provider_from_settings(settings)
        keks = Keks(provider, kek_resolver(settings, lambda kek: kek))
        yield db, Keyring(provider, cache, allow_legacy=settings.open_legacy_format, keks=keks)
    finally:
        cache.clear()
        db.dispose()


def rotation_status(settings: Settings, tenants: Sequence[str] | None = None) -> KeyStatusReport:
    """Per tenant: the data keys, their states, KEK versions and what each protects."""
    with _operator(settings) as (db, keyring):
        db.require_tenants(tenants)
        return key_status(db, keyring.provider, tenants)


def rotate_kek_job(
    settings: Settings,
    options: KekRotationOptions | None = None,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[KekProgress], None] | None = None,
    kek_ref: str | None = None,
) -> KekRotationReport:
    """Rotate the deployment's KEK (or ``kek_ref``, a tenant's own; or only catch up)
    and rewrap every data key under it."""
    options = options or KekRotationOptions()
    # Each worker may hold two connections at once (its batch, and the store of the one
    # before), and the run one more for its claim: sized by --workers, up to its maximum.
    with _operator(settings, connections=2 * options.workers + 1) as (db, keyring):
        provider = keyring.provider if kek_ref is None else keyring.keks.provider(kek_ref)
        return rotate_kek(db, provider, options, stop=stop, on_progress=on_progress)


def rotate_dek_job(
    settings: Settings,
    tenants: Sequence[str] | None,
    options: DekRotationOptions | None = None,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> DekRotationReport:
    """Rotate the data keys of ``tenants`` (None: every tenant with a key)."""
    options = options or DekRotationOptions()
    with _operator(settings, connections=options.workers + 1) as (db, keyring):
        db.require_tenants(tenants)
        return rotate_data_keys(db, keyring, tenants, options, stop=stop, on_progress=on_progress)


def tenant_key_job(
    settings: Settings,
    tenant_id: str,
    kek_ref: str | None,
    *,
    cache_max_age_seconds: int | None = None,
    batch_size: int = 100,
    stop: threading.Event | None = None,
    on_progress: Callable[[TenantKekProgress], None] | None = None,
) -> TenantKekReport:
    """Give ``tenant_id`` its own KEK (None: the deployment's again) and move its data
    keys under it (``tenantvault tenant-key set`` / ``unset``)."""
    with _operator(settings, connections=2) as (db, keyring):
        db.require_tenants([tenant_id])
        return move_tenant_keys(
            db,
            keyring,
            tenant_id,
            kek_ref,
            cache_max_age_seconds=cache_max_age_seconds,
            batch_size=batch_size,
            stop=stop,
            on_progress=on_progress,
        )


def tenant_key_status(
    settings: Settings, tenants: Sequence[str] | None = None
) -> list[TenantKekStatus]:
    """Each tenant's KEK, whether it is usable now, and its keys under another KEK
    (``tenantvault tenant-key show``)."""
    with _operator(settings, connections=1) as (db, keyring):
        db.require_tenants(tenants)
        return tenant_kek_status(db, keyring, tenants)


def shred_job(settings: Settings, tenant_id: str, *, dry_run: bool = False) -> ShredReport:
    """Destroy a tenant's data keys (crypto-shredding).

    Raises:
        InvalidInputError: ``tenant_id`` has no row in the ``tenants`` table (a
            mistyped id must not read as "destroyed no keys").
    """
    with _database(settings) as db:
        db.require_tenants([tenant_id])
        return shred_tenant(db, tenant_id, dry_run=dry_run)


def _mac_check(settings: Settings) -> MacCheck:
    """The key provider's MAC check, the provider built on first use only (verify
    needs it just for chains whose start retention cut)."""
    provider = functools.cache(lambda: key_provider_from_settings(settings))

    def check_mac(message: bytes, mac: str) -> bool:
        return provider().verify_mac(message, mac)

    return check_mac


def audit_verify_job(
    settings: Settings,
    tenants: Sequence[str] | None = None,
    *,
    expected_heads: Mapping[str, Head] | None = None,
) -> AuditVerifyReport:
    """Recompute the audit chains; the report names every broken row.
    The key provider is reached only for chains whose start retention cut."""
    with _database(settings) as db:
        db.require_tenants(tenants)
        return verify_audit(
            db, tenants, check_mac=_mac_check(settings), expected_heads=expected_heads
        )


def audit_prune_job(
    settings: Settings,
    *,
    keep_months: int,
    dry_run: bool = False,
    expected_heads: Mapping[str, Head] | None = None,
) -> PruneReport:
    """Drop audit partitions older than ``keep_months`` months (whole months only),
    after verifying every chain it cuts (and the ``expected_heads``); where each chain
    now starts is authenticated by the key provider. Raises
    :class:`~tenantvault.errors.AuditChainBroken` on a break, dropping nothing."""
    mac = None if dry_run else key_provider_from_settings(settings).mac
    with _database(settings) as db:
        return prune_audit(
            db,
            keep_months=keep_months,
            mac=mac,
            check_mac=_mac_check(settings),
            expected_heads=expected_heads,
            dry_run=dry_run,
        )


def audit_partitions_job(settings: Settings, *, months_ahead: int = 24) -> int:
    """Create the audit log's partitions for the coming months; returns how many were new."""
    with _database(settings) as db:
        return add_partitions(db, months_ahead)


def purge_job(settings: Settings, *, older_than_days: int, dry_run: bool = False) -> PurgeReport:
    """Purge configs deleted more than ``older_than_days`` days ago."""
    with _database(settings) as db:
        return purge_deleted_configs(
            db, older_than=timedelta(days=older_than_days), dry_run=dry_run
        )
