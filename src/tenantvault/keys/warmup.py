"""Fleet warm-up: many tenants' data keys unwrapped in few requests, before traffic.

A cold process serving T tenants would otherwise unwrap each key on its first
miss: one request to the key provider per key, while traffic waits. Warm-up reads
the usable keys (active and draining) of the tenants it is given, a chunk of
tenants per statement, each tenant's read scoped to it by row-level security
(:func:`tenantvault.keys.store.usable_keys`), and unwraps them in batches of the
provider's batch size: ceil(K / batch size) requests for K keys. Each key enters
the cache tied to the wrapping it was unwrapped from, as a miss puts it, so a key
rewrapped or replaced since is a miss again.

A key that does not unwrap fails only itself. An outage stops the warm-up (the
backoff then keeps later misses from calling, as after any failed unwrap); so
does a full cache, whose oldest keys the next ones would push out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import sqlalchemy as sa

from tenantvault.crypto.datakey import DataKey
from tenantvault.keys import store
from tenantvault.keys.backoff import OUTAGE, ProviderBackoff
from tenantvault.keys.cache import DataKeyCache
from tenantvault.kms.provider import KeyProvider

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

    def __init__(
        self, provider: KeyProvider, cache: DataKeyCache, backoff: ProviderBackoff
    ) -> None:
        self.provider = provider
        self.cache = cache
        self.backoff = backoff
        self.pending: list[store.TenantKey] = []
        self.warmed = self.already_cached = self.requests = 0
        self.failed: list[WarmFailure] = []
        self.stopped: str | None = None
        self.stopped_at: str | None = None  # the tenant whose keys were reached last

    def take(self, key: store.TenantKey) -> None:
        """Queue ``key`` (unless cached), unwrapping a batch once one is full."""
        if self.cache.holds(key.tenant_id, key.version, key.wrapped):
            self.already_cached += 1
            return
        if self.warmed + self.already_cached + len(self.pending) >= self.cache.max_entries:
            self.flush()
            if self.stopped is None:
                self.stop(
                    key.tenant_id, f"the key cache holds at most {self.cache.max_entries} keys"
                )
            return
        self.pending.append(key)
        if len(self.pending) >= self.provider.batch_size:
            self.flush()

    def flush(self) -> None:
        """Unwrap the queued keys in one request and cache those that unwrapped."""
        if not self.pending or self.stopped is not None:
            return
        batch, self.pending = self.pending, []
        try:
            with self.backoff.call("unwrap data keys"):
                self.requests += 1
                results = self.provider.unwrap_many([(k.tenant_id, k.wrapped) for k in batch])
        except OUTAGE as exc:
            self.stop(batch[0].tenant_id, str(exc))
            return
        for key, result in zip(batch, results, strict=True):
            if result.plaintext is None:
                reason = result.error or "did not unwrap"
                self.failed.append(WarmFailure(key.tenant_id, key.version, reason))
                continue
            self.cache.put(DataKey(key.tenant_id, key.version, result.plaintext), key.wrapped)
            self.warmed += 1

    def stop(self, tenant_id: str, reason: str) -> None:
        self.stopped, self.stopped_at = reason, tenant_id


def warm_keys(
    provider: KeyProvider,
    cache: DataKeyCache,
    backoff: ProviderBackoff,
    transaction: Transaction,
    tenant_ids: Sequence[str],
    read: ReadKeys = store.usable_keys,
) -> WarmReport:
    """Unwrap and cache the usable keys of ``tenant_ids`` (checked), which ``read``
    reads in ``transaction`` (the app's read by default), in batches; see the
    module's description."""
    tenants = list(dict.fromkeys(tenant_ids))
    warming = _Warming(provider, cache, backoff)
    for start in range(0, len(tenants), READ_CHUNK):
        with transaction() as connection:
            keys = read(connection, tenants[start : start + READ_CHUNK])
        for key in keys:
            warming.take(key)
            if warming.stopped is not None:
                break
        if warming.stopped is not None:
            break
    warming.flush()
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
