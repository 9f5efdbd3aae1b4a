"""A tenant's data keys: the active one for sealing, any version for opening.

The first key of a tenant is made on demand. Two processes may try at once:
both ask the key provider for a key, both INSERT version 1, the primary key lets
exactly one row in, and the loser reads and uses the winner's key.

Writers hold a shared per-tenant lock from reading the active key until they
commit; key rotation takes it exclusively to switch the active key and to retire
an old one, so no value can be sealed with a key after it was superseded and
counted as unused.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from tenantvault import audit
from tenantvault.crypto.datakey import DataKey
from tenantvault.db.models import AuditAction, DataKeyState, TenantDataKey
from tenantvault.errors import DecryptionError, KeyDestroyedError
from tenantvault.keys.cache import DataKeyCache
from tenantvault.kms.provider import KeyProvider

TENANT_KEYS_LOCK = 1_953_916_001
"""Advisory lock class of a tenant's keys (the other half is ``hashtext(tenant_id)``)."""

_LOCK_SHARED = sa.text("SELECT pg_advisory_xact_lock_shared(:cls, hashtext(:tenant_id))")
_LOCK_EXCLUSIVE = sa.text("SELECT pg_advisory_xact_lock(:cls, hashtext(:tenant_id))")


def lock_tenant_keys(connection: sa.Connection, tenant_id: str, *, exclusive: bool) -> None:
    """Hold the tenant's key lock until the transaction ends (shared: sealing; exclusive:
    switching, retiring or destroying keys)."""
    statement = _LOCK_EXCLUSIVE if exclusive else _LOCK_SHARED
    connection.execute(statement, {"cls": TENANT_KEYS_LOCK, "tenant_id": tenant_id})


_ACTIVE = sa.select(TenantDataKey.version, TenantDataKey.wrapped_key).where(
    TenantDataKey.tenant_id == sa.bindparam("tenant_id"),
    TenantDataKey.state == DataKeyState.ACTIVE,
)
_VERSION = sa.select(TenantDataKey.wrapped_key, TenantDataKey.state).where(
    TenantDataKey.tenant_id == sa.bindparam("tenant_id"),
    TenantDataKey.version == sa.bindparam("version"),
)


class Keyring:
    """Data keys per tenant, through a cache, from rows wrapped by the key provider."""

    def __init__(self, provider: KeyProvider, cache: DataKeyCache) -> None:
        self.provider = provider
        self.cache = cache

    def __repr__(self) -> str:
        return f"Keyring(provider={self.provider!r}, cache={self.cache!r})"

    def active_key(self, connection: sa.Connection, tenant_id: str) -> DataKey:
        """The key new values of ``tenant_id`` are sealed with (made if the tenant has none).

        ``connection`` must be in a transaction scoped to ``tenant_id``; it holds the
        tenant's key lock (shared) until it ends.
        """
        lock_tenant_keys(connection, tenant_id, exclusive=False)
        row = connection.execute(_ACTIVE, {"tenant_id": tenant_id}).one_or_none()
        if row is None:
            return self._create(connection, tenant_id)
        return self._active_from_row(tenant_id, row.version, row.wrapped_key)

    def _active_from_row(self, tenant_id: str, version: int, wrapped: str | None) -> DataKey:
        assert wrapped is not None  # an active key always has its wrapped form (CHECK)
        return self.cache.get_or_load(
            tenant_id, version, lambda: self._unwrap(tenant_id, version, wrapped)
        )

    def key(self, connection: sa.Connection, tenant_id: str, version: int) -> DataKey:
        """The key of ``version``; no database or provider call while it is cached.

        Raises:
            KeyDestroyedError: the tenant's keys were shredded.
            DecryptionError: no such key version (the sealed value names a key that never was).
        """
        cached = self.cache.get(tenant_id, version)
        if cached is not None:
            return cached

        def load() -> DataKey:
            row = connection.execute(_VERSION, {"tenant_id": tenant_id, "version": version})
            found = row.one_or_none()
            if found is None:
                raise DecryptionError("cannot open sealed value")
            wrapped, state = found
            if state == DataKeyState.DESTROYED or wrapped is None:
                raise KeyDestroyedError(f"data key {version} of tenant {tenant_id} was destroyed")
            return self._unwrap(tenant_id, version, wrapped)

        return self.cache.get_or_load(tenant_id, version, load)

    def _unwrap(self, tenant_id: str, version: int, wrapped: str) -> DataKey:
        return DataKey(tenant_id, version, self.provider.unwrap(tenant_id, wrapped))

    def _create(self, connection: sa.Connection, tenant_id: str) -> DataKey:
        plaintext, wrapped = self.provider.generate_data_key(tenant_id)
        next_version = sa.select(
            sa.literal(tenant_id, sa.Text),
            sa.func.coalesce(sa.func.max(TenantDataKey.version), 0) + 1,
            sa.literal(wrapped.ciphertext, sa.Text),
            sa.literal(wrapped.kek_version, sa.Integer),
        ).where(TenantDataKey.tenant_id == tenant_id)
        insert = (
            pg_insert(TenantDataKey)
            .from_select(["tenant_id", "version", "wrapped_key", "kek_version"], next_version)
            .on_conflict_do_nothing()
            .returning(TenantDataKey.version)
        )
        inserted = connection.execute(insert).scalar_one_or_none()
        if inserted is None:  # another process made it first: use theirs
            row = connection.execute(_ACTIVE, {"tenant_id": tenant_id}).one()
            return self._active_from_row(tenant_id, row.version, row.wrapped_key)
        audit.record(
            connection,
            tenant_id,
            AuditAction.DEK_CREATED,
            target_type="dek",
            target_id=str(inserted),
            details={"kek_version": wrapped.kek_version},
        )
        key = DataKey(tenant_id, inserted, plaintext)
        self.cache.put(key)
        return key
