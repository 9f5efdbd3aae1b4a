"""Fleet warm-up: many tenants' data keys unwrapped in few requests, before traffic.

A cold process serving T tenants would otherwise unwrap each key on its first
miss: one request to the key provider per key, while traffic waits. Warm-up reads
the usable keys (active and draining) of the tenants it is given, a chunk of
tenants per statement, each tenant's read scoped to it by row-level security
(:func:`tenantvault.keys.store.usable_keys`), and unwraps them in batches of the
provider's batch size, each KEK's keys in requests of their own: ceil(K / batch
size) requests for K keys under one KEK. Each key enters
the cache tied to the wrapping it was unwrapped from, as a miss puts it, so a key
rewrapped or replaced since is a miss again.

A key that does not unwrap fails only itself, and so do the keys of a tenant's own
KEK that is unavailable (revoked, or its KMS down). An outage of the deployment's
KEK stops the warm-up (the backoff then keeps later misses from calling, as after
any failed unwrap); so does a full cache, whose oldest keys the next ones would
push out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import sqlalchemy as sa

from tenantvault.crypto.datakey import DataKey
from tenantvault.errors import KeyProviderError, TenantKeyUnavailable
from tenantvault.keys import store
from tenantvault.keys.backoff import OUTAGE, ProviderBackoff
from tenantvault.keys.cache import DataKeyCache
from tenantvault.kms.keks import Keks

Gate = Callable[[str], ProviderBackoff]
"""The backoff gate before a KEK's unwraps, by key reference."""

Transaction = Callable[[], AbstractContextManager[sa.Connection]]
ReadKeys = Callable[[sa.Connection, Sequence[str]], list[store.TenantKey]]

READ_CHUNK = 1000
"""Tenants per statement: a bounded array parameter and a short transaction each."""


@dataclass(frozen=True)
class WarmFailure:
    """A key that did not unwrap (tampered, or wrapped for another tenant)."""

    tenant_id: str
    version: int
    reason: str


@dataclass(frozen=True)
class WarmReport:
    """What a warm-up did: counts, ids and reasons, never a key.

    ``not_warmed`` lists, in the order given, the tenants from the one whose keys
    were being unwrapped when the warm-up stopped (``stopped`` says why) to the last:
    their keys load on first use, as without warm-up."""

    tenants: int
    warmed: int
    already_cached: int
    unwrap_requests: int
    failed: tuple[WarmFailure, ...] = ()
    not_warmed: tuple[str, ...] = ()
    stopped: str | None = None

    @property
    def ok(self) -> bool:
        """Every usable key of every tenant is cached."""
        return not self.failed and self.stopped is None


class _Warming:
    """One warm-up's progress: the keys waiting for a batch, and what was done."""

    def __init__(self, keks: Keks, cache: DataKeyCache, gate: Gate) -> None:
        self.keks = keks
        self.cache = cache
        self.gate = gate
        self.pending: dict[str, list[store.TenantKey]] = {}  # by KEK
        self.warmed = self.already_cached = self.requests = 0
        self.failed: list[WarmFailure] = []
        self.stopped: str | None = None
        self.stopped_at: str | None = None  # the tenant whose keys were reached last

    def take(self, key: store.TenantKey) -> None:
        """Queue ``key`` (unless cached), unwrapping a batch once one is full."""
        if self.cache.holds(key.tenant_id, key.version, key.wrapped):
            self.already_cached += 1
            return
        queued = sum(map(len, self.pending.values()))
        if self.warmed + self.already_cached + queued >= self.cache.max_entries:
            self.flush_all()
            if self.stopped is None:
                self.stop(
                    key.tenant_id, f"the key cache holds at most {self.cache.max_entries} keys"
                )
            return
        pending = self.pending.setdefault(key.kek_ref, [])
        pending.append(key)
        if len(pending) >= self._batch_size(key.kek_ref):
            self.flush(key.kek_ref)

    def _batch_size(self, kek_ref: str) -> int:
        try:
            return self.keks.provider(kek_ref).batch_size
        except KeyProviderError:
            return 1  # no provider for it: each key fails at once, alone

    def flush_all(self) -> None:
        for kek_ref in list(self.pending):
            self.flush(kek_ref)

    def flush(self, kek_ref: str) -> None:
        """Unwrap the keys queued for one KEK in one request and cache those that
        unwrapped."""
        batch = self.pending.pop(kek_ref, [])
        if not batch or self.stopped is not None:
            return
        try:
            with self.gate(kek_ref).call("unwrap data keys"):
                provider = self.keks.provider(kek_ref)
                self.requests += 1
                results = provider.unwrap_many([(k.tenant_id, k.wrapped) for k in batch])
        except KeyProviderError as exc:
            if self.keks.is_default(kek_ref):
                if not isinstance(exc, OUTAGE):
                    raise
                self.stop(batch[0].tenant_id, str(exc))
                return
            # A tenant's own KEK: its keys fail; the other tenants' warm on.
            for key in batch:
                reason = str(TenantKeyUnavailable(key.tenant_id, kek_ref))
                self.failed.append(WarmFailure(key.tenant_id, key.version, reason))
            return
        for key, result in zip(batch, results, strict=True):
            if result.plaintext is None:
                reason = result.error or "did not unwrap"
                self.failed.append(WarmFailure(key.tenant_id, key.version, reason))
                continue
            self.cache.put(
                DataKey(key.tenant_id, key.version, result.plaintext),
                key.wrapped,
                max_age_seconds=key.max_age_seconds,
            )
            self.warmed += 1

    def stop(self, tenant_id: str, reason: str) -> None:
        self.stopped, self.stopped_at = reason, tenant_id


def warm_keys(
    keks: Keks,
    cache: DataKeyCache,
    gate: Gate,
    transaction: Transaction,
    tenant_ids: Sequence[str],
    read: ReadKeys = store.usable_keys,
) -> WarmReport:
    """Unwrap and cache the usable keys of ``tenant_ids`` (checked), which ``read``
    reads in ``transaction`` (the app's read by default), in batches; see the
    module's description."""
    tenants = list(dict.fromkeys(tenant_ids))
    warming = _Warming(keks, cache, gate)
    for start in range(0, len(tenants), READ_CHUNK):
        with transaction() as connection:
            keys = read(connection, tenants[start : start + READ_CHUNK])
        for key in keys:
            warming.take(key)
            if warming.stopped is not None:
                break
        if warming.stopped is not None:
            break
    warming.flush_all()
    not_warmed: list[str] = []
    if warming.stopped_at is not None:
        not_warmed = tenants[tenants.index(warming.stopped_at) :]
    return WarmReport(
        tenants=len(tenants),
        warmed=warming.warmed,
        already_cached=warming.already_cached,
        unwrap_requests=warming.requests,
        failed=tuple(warming.failed),
        not_warmed=tuple(not_warmed),
        stopped=warming.stopped,
    )
