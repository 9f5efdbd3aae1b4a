"""A tenant's data keys, handed out only as sealing: :class:`Sealer`, never key bytes.

The first key of a tenant is made on demand. Two processes may try at once:
both ask the key provider for a key, both insert version 1, the primary key lets
exactly one row in, and the loser reads and uses the winner's key.

Writers hold a shared per-tenant lock from reading the active key until they
commit; key rotation takes it exclusively to switch the active key and to retire
an old one, so no value can be sealed with a key after it was superseded and
counted as unused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NoReturn

import sqlalchemy as sa

from tenantvault.crypto.datakey import DataKey
from tenantvault.crypto.envelope import (
    Resealer,
    SealContext,
    is_current_format,
    open_sealed,
    open_with_key_of,
    reseal,
    seal,
    sealed_dek_version,
)
from tenantvault.errors import (
    DecryptionError,
    KeyDestroyedError,
    KeyProviderError,
    TenantKeyUnavailable,
)
from tenantvault.keys import legacy, store
from tenantvault.keys.backoff import ProviderBackoff
from tenantvault.keys.cache import DataKeyCache
from tenantvault.keys.warmup import Transaction, WarmReport, warm_keys
from tenantvault.kms.keks import Keks
from tenantvault.kms.provider import KeyProvider, WrappedKey

log = logging.getLogger("tenantvault")


class Keyring:
    """Data keys per tenant, through a cache, from rows wrapped by the key provider."""

    def __init__(
        self,
        provider: KeyProvider,
        cache: DataKeyCache,
        *,
        allow_legacy: bool = True,
        backoff: ProviderBackoff | None = None,
        keks: Keks | None = None,
    ) -> None:
        """A keyring over ``provider``, keeping unwrapped keys in ``cache``.

        Args:
            provider: the deployment's KEK, which wraps the data keys of every tenant
                without a KEK of its own.
            cache: where unwrapped keys are kept between transactions.
            allow_legacy: open values in the old format (bound to their place only);
                turn it off once ``rotate-keys status`` counts none left.
            backoff: the gate before unwraps after the provider failed (default: 1 s
                doubling to 30 s). Each tenant KEK gets a gate of its own, alike, so
                a customer's revoked key shuts out only its tenants.
            keks: the KEKs by reference, ``provider`` the default among them (default:
                ``provider`` alone).
        """
        self.provider = provider
        self.keks = keks or Keks(provider)
        self.cache = cache
        self.allow_legacy = allow_legacy
        self.backoff = backoff or ProviderBackoff()
        self._gates: dict[str, ProviderBackoff] = {}  # tenant KEKs' own

    def __repr__(self) -> str:
        return f"Keyring(provider={self.provider!r}, cache={self.cache!r})"

    def sealer(
        self, connection: sa.Connection, tenant_id: str, *, active_version: int | None = None
    ) -> Sealer:
        """Sealing and opening for ``tenant_id`` in ``connection``'s transaction.

        Args:
            connection: in a transaction scoped to ``tenant_id`` (or the migrator's).
            tenant_id: whose values.
            active_version: seal under this key version (key rotation, which holds the
                tenant). Otherwise the first seal reads the active key — made if the
                tenant has none — and holds the tenant's key lock, shared, until the
                transaction ends.
        """
        return Sealer(self, connection, tenant_id, active_version)

    def open_cached(
        self,
        tenant_id: str,
        sealed: str,
        place: SealContext,
        *,
        oldest_usable_version: int | None,
    ) -> bytes | None:
        """Open ``sealed`` if it is in the current format and its key is cached and still
        usable; None otherwise (no database, no KMS: the caller then takes the full path,
        which reads the key's state and refuses a retired or destroyed one, and asks the
        database whether an older-format value may open at all: :mod:`.legacy`).

        ``oldest_usable_version`` is the tenant's oldest active or draining key version
        as the database holds it now (None: the tenant has none), read by the hot
        path's own statement. The cache alone cannot know that another process (a
        rotation, a shred) retired or destroyed a key it holds: a value naming an older
        version is not opened here, and those keys leave the cache.

        Raises:
            DecryptionError: the value is malformed or does not open in ``place``.
        """

        def usable_key(version: int) -> DataKey | None:
            if oldest_usable_version is None or version < oldest_usable_version:
                self.cache.evict_unusable(tenant_id, oldest_usable_version)
                return None
            return self.cache.get(tenant_id, version)

        if not is_current_format(sealed):
            return None
        return open_with_key_of(usable_key, sealed, place, allow_legacy=False)

    def warm(self, transaction: Transaction, tenant_ids: Sequence[str]) -> WarmReport:
        """Cache the usable keys of ``tenant_ids`` in batch unwraps: ceil(K / batch size)
        requests for K keys not cached yet (:mod:`tenantvault.keys.warmup`).

        ``transaction`` opens the application's transactions (its role reads each
        tenant's keys scoped to that tenant); the ids are checked by the caller."""
        return warm_keys(self.keks, self.cache, self.gate, transaction, tenant_ids)

    def warm_window(self) -> int:
        """How many tenants' keys one warm-up ahead of a rotation should take: one
        provider batch, and at most a quarter of the cache, which also holds the keys
        being rotated (two per tenant)."""
        return max(1, min(self.provider.batch_size, self.cache.max_entries // 4))

    def warm_usable(self, transaction: Transaction, tenant_ids: Sequence[str]) -> WarmReport:
        """As :meth:`warm`, for a rotation: ``transaction`` is the migrator's, which reads
        every usable key (draining ones too) of many tenants at once. Its own backoff:
        an outage met here does not shut the gate the application's unwraps pass."""
        gates: dict[str, ProviderBackoff] = {}
        return warm_keys(
            self.keks,
            self.cache,
            lambda ref: gates.setdefault(ref, ProviderBackoff()),
            transaction,
            tenant_ids,
            store.usable_keys_of_any,
        )

    def wrapped_anew(self, tenant_id: str, wrapped: str, from_ref: str, to_ref: str) -> WrappedKey:
        """A tenant's data key, wrapped by ``from_ref`` as ``wrapped``, wrapped by
        ``to_ref`` instead (moving a tenant to its own KEK, or back). The key's bytes
        stay here; the caller gets only the new wrapping.

        Raises:
            KeyProviderError, DecryptionError: the old KEK does not unwrap it, or the new
                one does not wrap.
        """
        plaintext = self.keks.provider(from_ref).unwrap(tenant_id, wrapped)
        return self.keks.provider(to_ref).wrap(tenant_id, plaintext)

    def gate(self, kek_ref: str) -> ProviderBackoff:
        """The backoff gate before ``kek_ref``'s unwraps (one per KEK)."""
        if self.keks.is_default(kek_ref):
            return self.backoff
        found = self._gates.get(kek_ref)
        if found is None:
            found = self._gates.setdefault(
                kek_ref,
                ProviderBackoff(
                    initial_seconds=self.backoff.initial_seconds,
                    max_seconds=self.backoff.max_seconds,
                ),
            )
        return found

    def new_key(self, tenant_id: str, kek_ref: str | None = None) -> NewKey:
        """A new data key for ``tenant_id`` wrapped by ``kek_ref`` (the deployment's KEK
        when None), to hand to :meth:`switch` later (asked for ahead of a rotation);
        stored nowhere yet."""
        ref = kek_ref or self.keks.default_ref
        plaintext, wrapped = self._generate(tenant_id, ref)
        return NewKey(tenant_id, plaintext, wrapped, ref)

    def _generate(self, tenant_id: str, kek_ref: str) -> tuple[bytes, WrappedKey]:
        if self.keks.is_default(kek_ref):
            return self.provider.generate_data_key(tenant_id)
        try:
            return self.keks.provider(kek_ref).generate_data_key(tenant_id)
        except KeyProviderError as exc:
            raise TenantKeyUnavailable(tenant_id, kek_ref, _reason(exc)) from None

    def switch(
        self,
        transaction: Transaction,
        tenant_id: str,
        from_version: int,
        actor: str,
        new_key: NewKey | None = None,
    ) -> int:
        """A new active key for ``tenant_id``; ``from_version`` starts draining. The new
        key is ``new_key`` (asked for ahead) or comes from the key provider now, before
        ``transaction`` opens (no lock is held while the provider answers). Returns the
        new version.

        Raises:
            RotationError: ``from_version`` is not the active key any more, or a second
                new key's KEK version is older than the active key's too.
        """
        if new_key is not None and new_key.tenant_id != tenant_id:
            raise ValueError("a new data key is for the tenant it was made for")
        made = new_key or self.new_key(tenant_id)
        for attempt in range(3):
            try:
                with transaction() as connection:
                    version = store.switch(
                        connection,
                        tenant_id,
                        from_version,
                        made.wrapped,
                        made.kek_ref,
                        default_ref=self.keks.default_ref,
                        actor=actor,
                    )
                break
            except store.OlderKekVersionError:
                # Made before a KEK rotation that rewrapped the active key since (asked
                # for ahead, or in line while the rotation ran): again, with a key made now.
                if attempt == 2:
                    raise
                made = self.new_key(tenant_id, made.kek_ref)
            except store.KekChangedError as changed:
                # Asked for ahead under the deployment's KEK, and the tenant has its own
                # (or its KEK changed since): again, under the tenant's KEK.
                if attempt == 2:
                    raise
                made = self.new_key(tenant_id, changed.kek_ref)
        # Committed: from here on the key is the one stored.
        self.cache.put(DataKey(tenant_id, version, made._plaintext), made.wrapped.ciphertext)
        return version

    # --- for Sealer ---

    def _active_key(self, connection: sa.Connection, tenant_id: str) -> DataKey:
        store.lock_tenant_keys(connection, tenant_id, exclusive=False)
        found = store.active(connection, tenant_id)
        if found is None:
            return self._create(connection, tenant_id)
        return self._cached(tenant_id, found)

    def _cached(self, tenant_id: str, stored: store.StoredKey) -> DataKey:
        """The key of ``stored``, through the cache unless this transaction wrote it."""
        if stored.uncommitted:  # made earlier in this transaction: it may roll back
            return self._unwrap(tenant_id, stored)
        return self.cache.get_or_load(
            tenant_id,
            stored.version,
            lambda: self._unwrap(tenant_id, stored),
            wrapped=stored.wrapped,
            max_age_seconds=stored.max_age_seconds,
        )

    def _key(self, connection: sa.Connection, tenant_id: str, version: int) -> DataKey:
        """The key of ``version``, if its row says it may still open values; no provider
        call while it is cached.

        The row is read even when the key is cached: another process may have retired
        or destroyed it since (a leaked retired key must open nothing).

        Raises:
            KeyDestroyedError: the tenant's keys were shredded.
            DecryptionError: no such key version (the sealed value names a key that never
                was), or the key is retired (no value may name it any more: one that
                does was forged or put back by SQL).
        """
        try:
            stored = store.wrapped(connection, tenant_id, version)
        except LookupError:
            raise DecryptionError("cannot open sealed value") from None
        if stored is None:
            self.cache.evict_unusable(tenant_id, version + 1)
            raise KeyDestroyedError(f"data key {version} of tenant {tenant_id} was destroyed")
        if stored.state == store.RETIRED:
            # Versions retire oldest first, so every version up to this one is retired
            # or destroyed: none of them may stay cached.
            self.cache.evict_unusable(tenant_id, version + 1)
            log.warning(
                "a value of tenant %s names retired data key %s: refused", tenant_id, version
            )
            raise DecryptionError("cannot open sealed value")
        return self._cached(tenant_id, stored)

    def _unwrap(self, tenant_id: str, stored: store.StoredKey) -> DataKey:
        """Ask the key's KEK, unless it failed recently (then fail at once: no stampede).

        Raises:
            TenantKeyUnavailable: the key is under the tenant's own KEK, and that KEK
                refuses, is gone, or cannot be reached; the other tenants are untouched.
        """
        ref = stored.kek_ref
        if self.keks.is_default(ref):
            with self.backoff.call("unwrap a data key"):
                plaintext = self.provider.unwrap(tenant_id, stored.wrapped)
            return DataKey(tenant_id, stored.version, plaintext)
        try:
            with self.gate(ref).call("unwrap a data key"):
                provider = self.keks.provider(ref)
                plaintext = provider.unwrap(tenant_id, stored.wrapped)
        except KeyProviderError as exc:
            raise TenantKeyUnavailable(tenant_id, ref, _reason(exc)) from None
        except DecryptionError:
            # A deleted transit key answers as a ciphertext that does not open: tell a
            # revoked KEK (which fails the probe) from a tampered wrapping (which fails
            # alone).
            try:
                provider.check_usable()
            except KeyProviderError as exc:
                raise TenantKeyUnavailable(tenant_id, ref, _reason(exc)) from None
            raise
        return DataKey(tenant_id, stored.version, plaintext)

    def _create(self, connection: sa.Connection, tenant_id: str) -> DataKey:
        ref = store.tenant_kek(connection, tenant_id) or self.keks.default_ref
        plaintext, wrapped = self._generate(tenant_id, ref)
        version = store.create_first(connection, tenant_id, wrapped, ref)
        if version is None:  # another process made it first: use theirs
            found = store.active(connection, tenant_id)
            assert found is not None
            return self._cached(tenant_id, found)
        # Not cached: this transaction may still roll back while another process
        # commits a different key under the same version. The sealer that asked keeps
        # it for this transaction; later transactions read the committed row.
        return DataKey(tenant_id, version, plaintext)


def _reason(exc: KeyProviderError) -> str:
    """Why a tenant's KEK failed, in the provider's words (they name addresses and keys,
    never key material)."""
    return str(exc)


class NewKey:
    """A data key made for a tenant and not stored yet: for :meth:`Keyring.switch`
    only. Its bytes stay inside this package; it neither prints nor pickles them."""

    __slots__ = ("_plaintext", "kek_ref", "tenant_id", "wrapped")

    def __init__(self, tenant_id: str, plaintext: bytes, wrapped: WrappedKey, kek_ref: str) -> None:
        self.tenant_id = tenant_id
        self._plaintext = plaintext
        self.wrapped = wrapped
        self.kek_ref = kek_ref

    def __repr__(self) -> str:
        return (
            f"NewKey(tenant_id={self.tenant_id!r}, kek_ref={self.kek_ref!r}, "
            f"kek_version={self.wrapped.kek_version})"
        )

    def __reduce__(self) -> NoReturn:
        raise TypeError("a data key cannot be pickled")


class Sealer:
    """Seals, opens and re-seals one tenant's values by place, in one transaction.

    Bound to a tenant and a connection; the keys stay inside (Tink's "get a
    primitive, never the key bytes"). Keys it fetched are kept for its lifetime,
    so a batch of values under one key costs one cache lookup.
    """

    __slots__ = (
        "_active",
        "_active_version",
        "_connection",
        "_keyring",
        "_keys",
        "_unrecorded",
        "tenant_id",
    )

    def __init__(
        self,
        keyring: Keyring,
        connection: sa.Connection,
        tenant_id: str,
        active_version: int | None,
    ) -> None:
        self._keyring = keyring
        self._connection = connection
        self.tenant_id = tenant_id
        self._active_version = active_version
        self._active: DataKey | None = None
        self._keys: dict[int, DataKey] = {}
        self._unrecorded = 0  # seals not yet added to the key's count

    def __repr__(self) -> str:
        return f"Sealer(tenant_id={self.tenant_id!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("Sealer refuses to be pickled")

    def _check(self, place: SealContext) -> None:
        if place.tenant_id != self.tenant_id:
            raise ValueError("a sealer seals and opens only its own tenant's values")

    def _sealing_key(self) -> DataKey:
        if self._active is None:
            if self._active_version is None:
                self._active = self._keyring._active_key(self._connection, self.tenant_id)
            else:
                self._active = self._key_of(self._active_version)
        return self._active

    def _key_of(self, version: int) -> DataKey:
        if self._active is not None and self._active.version == version:
            return self._active  # maybe made in this transaction: not in the cache
        key = self._keys.get(version)
        if key is None:
            key = self._keys[version] = self._keyring._key(
                self._connection, self.tenant_id, version
            )
        return key

    def seal(self, plaintext: bytes, place: SealContext) -> str:
        """``plaintext`` sealed under the tenant's active key for ``place``."""
        self._check(place)
        sealed = seal(self._sealing_key(), plaintext, place)
        self._unrecorded += 1
        return sealed

    def record_seals(self) -> None:
        """Add the seals made since the last call to the sealing key's count (its nonce
        budget), in this transaction. Callers call it once their seals are done."""
        if self._active is not None:
            store.count_seals(
                self._connection, self.tenant_id, self._active.version, self.take_seals()
            )

    def take_seals(self) -> int:
        """The seals made since the last call, for a caller that records them itself."""
        seals, self._unrecorded = self._unrecorded, 0
        return seals

    def open(self, sealed: str, place: SealContext) -> bytes:
        """Open a value of ``place`` with the key version it names.

        Raises:
            DecryptionError: wrong place, or any change to the value.
            KeyDestroyedError: the key it names was destroyed.
        """
        self._check(place)
        legacy.check_allowed(self._connection, place, sealed)
        key = self._key_of(sealed_dek_version(sealed))
        return open_sealed(key, sealed, place, allow_legacy=self._keyring.allow_legacy)

    def resealer(self, table: str, column: str) -> Callable[[str, str, bytes, bytes | None], str]:
        """:meth:`reseal` for many values of one column (key rotation), each given as
        ``(sealed, row_id, binding, legacy_binding)``: what they share is prepared
        once. Each counts as a seal. The sealing key is read now, so the values
        re-sealed later need no statement of their own but for an older key not
        fetched yet.

        Raises:
            DecryptionError, KeyDestroyedError: as :meth:`open` (from the callable).
        """
        resealer = Resealer(
            self.tenant_id,
            table,
            column,
            self._key_of,
            self._sealing_key(),
            allow_legacy=self._keyring.allow_legacy,
        )

        def reseal(sealed: str, row_id: str, binding: bytes, legacy: bytes | None) -> str:
            resealed = resealer.reseal(sealed, row_id, binding, legacy)
            self._unrecorded += 1
            return resealed

        return reseal

    def reseal(self, sealed: str, place: SealContext) -> str:
        """Open a value of ``place`` and seal it again under the active key (rotation).

        Raises:
            DecryptionError, KeyDestroyedError: as :meth:`open`.
        """
        self._check(place)
        resealed = reseal(
            sealed,
            place,
            self._key_of,
            self._sealing_key(),
            allow_legacy=self._keyring.allow_legacy,
        )
        self._unrecorded += 1
        return resealed
