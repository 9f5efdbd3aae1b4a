"""A bounded, thread-safe in-process cache of plaintext data keys, with single flight.

In the spirit of the AWS Encryption SDK's caching materials manager: an entry
lives at most ``max_age`` seconds and serves at most ``max_uses`` lookups; at most
``max_entries`` keys are held (least recently used goes first). On a miss,
concurrent callers for the same key share one load: N threads opening a cold
tenant make one call to the key provider.

An entry remembers a digest of the wrapped key it was unwrapped from. A caller
that has just read the stored wrapped key passes it, and an entry made from
any other wrapping (a key that was never committed, a row replaced since) is a
miss: the cache cannot serve a key that is not the one stored.

A caller waiting for another's load blocks its thread by default. ``AsyncVault``
passes ``wait`` that suspends its task instead (its tasks share one thread: a
blocked follower would stall the leader's load, and the whole event loop).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from tenantvault.crypto.datakey import DataKey
from tenantvault.metrics import EvictionReason, Metrics, default_metrics

CacheKey = tuple[str, int]
Wait = Callable[[Future[DataKey]], DataKey]
"""How a caller waits for another caller's load of the same key."""


@dataclass
class _Entry:
    key: DataKey
    loaded_at: float
    wrapped_digest: bytes | None
    uses: int = 0
    # Its tenant's own bound (tenant_keks: the revocation delay of a customer's key),
    # when lower than the cache's.
    max_age_seconds: float | None = None


def _digest(wrapped: str | None) -> bytes | None:
    return None if wrapped is None else hashlib.sha256(wrapped.encode()).digest()


@dataclass
class CacheStats:
    hits: int = 0
    loads: int = 0


class DataKeyCache:
    """Plaintext data keys by (tenant id, version)."""

    def __init__(
        self,
        *,
        max_age_seconds: float,
        max_entries: int,
        max_uses: int,
        clock: Callable[[], float] = time.monotonic,
        wait: Wait = Future.result,
        metrics: Metrics | None = None,
    ) -> None:
        """A cache within these bounds.

        Args:
            max_age_seconds: an entry's lifetime.
            max_entries: how many keys are held (least recently used goes first).
            max_uses: lookups an entry serves before it is loaded again.
            clock: seconds, monotonic (tests move it).
            wait: how a follower waits for the leader's load of the same key; the
                default blocks the calling thread.
            metrics: where hits, misses and evictions are counted (the global meter
                provider's instruments when None).
        """
        if max_age_seconds <= 0 or max_entries < 1 or max_uses < 1:
            raise ValueError("cache bounds must be positive")
        self.max_age_seconds = max_age_seconds
        self.max_entries = max_entries
        self.max_uses = max_uses
        self._clock = clock
        self._wait = wait
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._in_flight: dict[CacheKey, Future[DataKey]] = {}
        self._lock = threading.Lock()
        self.stats = CacheStats()
        # Plain integers under the lock, read when metrics are collected: nothing
        # on a hit reaches the OpenTelemetry SDK.
        self._counts = (metrics or default_metrics()).cache_counts()

    def __repr__(self) -> str:
        return f"DataKeyCache(entries={len(self._entries)}, max_entries={self.max_entries})"

    def __reduce__(self) -> str:
        raise TypeError("DataKeyCache refuses to be pickled")

    def _fresh(self, cache_key: CacheKey, wrapped_digest: bytes | None = None) -> DataKey | None:
        """The cached key if still within bounds and, when ``wrapped_digest`` is given,
        unwrapped from that wrapping (call with the lock held); counts a use."""
        entry = self._entries.get(cache_key)
        if entry is None:
            return None
        stale = self._stale(entry, wrapped_digest)
        if stale is not None:
            del self._entries[cache_key]
            self._counts.evictions[stale] += 1
            return None
        entry.uses += 1
        self._entries.move_to_end(cache_key)
        self.stats.hits += 1
        self._counts.hits += 1
        return entry.key

    def _serves(self, entry: _Entry, wrapped_digest: bytes | None) -> bool:
        """Whether ``entry`` is within its bounds and, when ``wrapped_digest`` is given,
        was unwrapped from that wrapping."""
        return self._stale(entry, wrapped_digest) is None

    def _stale(self, entry: _Entry, wrapped_digest: bytes | None) -> EvictionReason | None:
        """Why ``entry`` may not be served (the bound it is past, or another wrapping
        than ``wrapped_digest`` when given); None when it may."""
        max_age = self.max_age_seconds
        if entry.max_age_seconds is not None:
            max_age = min(max_age, entry.max_age_seconds)
        if self._clock() - entry.loaded_at >= max_age:
            return "max_age"
        if entry.uses >= self.max_uses:
            return "max_uses"
        if wrapped_digest is not None and entry.wrapped_digest != wrapped_digest:
            return "wrapping_changed"
        return None

    def get(self, tenant_id: str, version: int) -> DataKey | None:
        """The cached key, or None (never loads)."""
        with self._lock:
            return self._fresh((tenant_id, version))

    def holds(self, tenant_id: str, version: int, wrapped: str) -> bool:
        """Whether a fresh entry unwrapped from ``wrapped`` is held (counts no use)."""
        with self._lock:
            entry = self._entries.get((tenant_id, version))
            return entry is not None and self._serves(entry, _digest(wrapped))

    def put(
        self, key: DataKey, wrapped: str | None = None, *, max_age_seconds: float | None = None
    ) -> None:
        """Cache ``key``, unwrapped from (or wrapped as) ``wrapped``, for at most
        ``max_age_seconds`` when given and lower than the cache's bound. Only for a key
        whose row is committed: a key of a transaction that may still roll back stays out."""
        with self._lock:
            self._store(key, _digest(wrapped), max_age_seconds)

    def _store(
        self, key: DataKey, wrapped_digest: bytes | None, max_age_seconds: float | None
    ) -> None:
        self._entries[(key.tenant_id, key.version)] = _Entry(
            key, self._clock(), wrapped_digest, 1, max_age_seconds
        )
        self._entries.move_to_end((key.tenant_id, key.version))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self._counts.evictions["max_entries"] += 1

    def get_or_load(
        self,
        tenant_id: str,
        version: int,
        load: Callable[[], DataKey],
        *,
        wrapped: str | None = None,
        max_age_seconds: float | None = None,
    ) -> DataKey:
        """The cached key, or the result of ``load`` shared by every concurrent caller.

        ``wrapped`` is the stored wrapped key ``load`` unwraps: an entry made from
        another wrapping is not served. ``max_age_seconds``: as :meth:`put`."""
        cache_key = (tenant_id, version)
        digest = _digest(wrapped)
        with self._lock:
            cached = self._fresh(cache_key, digest)
            if cached is not None:
                return cached
            pending = self._in_flight.get(cache_key)
            leader = pending is None
            if pending is None:
                pending = Future()
                self._in_flight[cache_key] = pending
                self._counts.misses += 1
        if not leader:
            return self._wait(pending)
        try:
            key = load()
        except BaseException as exc:
            with self._lock:
                del self._in_flight[cache_key]
            pending.set_exception(exc)
            raise
        with self._lock:
            self.stats.loads += 1
            self._store(key, digest, max_age_seconds)
            del self._in_flight[cache_key]
        pending.set_result(key)
        return key

    def evict_unusable(self, tenant_id: str, oldest_usable: int | None) -> int:
        """Drop the tenant's keys older than ``oldest_usable`` (all of them when None):
        keys another process retired or destroyed since they were cached. Returns how
        many were dropped."""
        with self._lock:
            evicted = [
                k
                for k in self._entries
                if k[0] == tenant_id and (oldest_usable is None or k[1] < oldest_usable)
            ]
            for cache_key in evicted:
                del self._entries[cache_key]
            self._counts.evictions["retired"] += len(evicted)
            return len(evicted)

    def evict_tenant(self, tenant_id: str) -> None:
        with self._lock:
            evicted = [k for k in self._entries if k[0] == tenant_id]
            for cache_key in evicted:
                del self._entries[cache_key]
            self._counts.evictions["tenant_evicted"] += len(evicted)

    def clear(self) -> None:
        with self._lock:
            self._counts.evictions["cleared"] += len(self._entries)
            self._entries.clear()
