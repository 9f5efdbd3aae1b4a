"""Crypto-shredding: destroy a tenant's data keys, so its sealed values never open again.

The wrapped keys are erased from ``tenant_data_keys`` (state ``destroyed``); the
tenant's configs, tokens and history stay as records, their sealed values now
noise. Loading one raises :class:`~tenantvault.errors.KeyDestroyedError`.

What it cannot reach: a database backup taken before the shred still holds the
wrapped keys, and Vault can still unwrap them. Raising the transit key's
``min_decryption_version`` after a KEK rotation (``rotate-keys kek
--min-decryption-version``) closes that, for every tenant's old backups at once.
A process that had a key cached opens nothing with it after the shred: every load
reads whether the key it names is still usable (the hot path in its one statement),
refuses, and drops the key from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from tenantvault.db.operator import DEK_ROTATION_CLAIM, OperatorDatabase
from tenantvault.db.session import check_tenant_id
from tenantvault.errors import RotationError
from tenantvault.keys import store
from tenantvault.keys.cache import DataKeyCache
from tenantvault.keys.sealed import SEALED_COLUMNS

ACTOR = "shred"


@dataclass(frozen=True)
class ShredReport:
    tenant_id: str
    dry_run: bool
    destroyed_versions: list[int]
    sealed_values: int  # values that can never be opened again


def shred_tenant(
    db: OperatorDatabase,
    tenant_id: str,
    *,
    dry_run: bool = False,
    cache: DataKeyCache | None = None,
) -> ShredReport:
    """Destroy every data key of ``tenant_id`` (one transaction; no KMS call needed).

    Writers of the tenant finish first (the exclusive key lock); a writer after the
    shred gets a fresh key, so new secrets of the tenant are unaffected. A DEK
    rotation of the tenant and a shred exclude each other (the same claim): a
    rotation resumed after a shred could re-seal new secrets under a destroyed key.

    Raises:
        RotationError: a rotation of the tenant is running; nothing was destroyed.
    """
    check_tenant_id(tenant_id)
    with db.claim(DEK_ROTATION_CLAIM, tenant_id) as claimed:
        if not claimed:
            raise RotationError(
                f"tenant {tenant_id} is being rotated by another process; nothing was "
                "destroyed: shred it when that run has ended"
            )
        return _shred(db, tenant_id, dry_run=dry_run, cache=cache)


def _shred(
    db: OperatorDatabase, tenant_id: str, *, dry_run: bool, cache: DataKeyCache | None
) -> ShredReport:
    with db.transaction() as connection:
        store.lock_tenant_keys(connection, tenant_id, exclusive=True)
        values = sum(
            int(
                connection.execute(
                    sa.text(
                        f"SELECT count(*) FROM {db.table(column.table)} "
                        f"WHERE tenant_id = :t AND {column.column} IS NOT NULL"
                    ),
                    {"t": tenant_id},
                ).scalar_one()
            )
            for column in SEALED_COLUMNS
        )
        if dry_run:
            destroyed = store.live_versions(connection, tenant_id)
        else:
            destroyed = store.destroy_all(connection, tenant_id, sealed_values=values, actor=ACTOR)
    if cache is not None and not dry_run:
        cache.evict_tenant(tenant_id)
    return ShredReport(tenant_id, dry_run, destroyed, values)
