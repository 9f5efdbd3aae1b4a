"""A small least-recently-used cache bounded by the bytes it holds, not by its count.

For the load hot path's config digests (:func:`tenantvault.keys.sealed.stored_config_digest`):
they are keyed by a config's full text, so a count bound alone lets a few large
configs, each version a new key, grow a process by megabytes (an ``lru_cache`` of
4,096 entries held 30 versions of a 1.9 MB config). Each entry is charged the size of
its key's parts and of its value, as Python holds them, plus a fixed overhead; an
entry larger than the whole bound is computed and not kept.

Keyed by a tuple of the arguments, so a caller that adds an argument (the provider
type, say) adds it to the tuple.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

ENTRY_OVERHEAD = 200
"""Bytes charged per entry beyond its key's parts and its value: the tuple, the
ordered dict's slot and link, the size record (an estimate on the high side)."""


class ByteBoundedCache:
    """``(key parts) -> bytes``, least recently used first out, at most ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[Hashable, ...], tuple[bytes, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"ByteBoundedCache(entries={len(self)}, bytes={self.size}, max_bytes={self.max_bytes})"
        )

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """What the entries held are charged, together (never above ``max_bytes``)."""
        return self._bytes

    @staticmethod
    def cost(key: tuple[Hashable, ...], value: bytes) -> int:
        """What an entry is charged: its key's parts and its value as Python holds them."""
        return ENTRY_OVERHEAD + sys.getsizeof(value) + sum(sys.getsizeof(part) for part in key)

    def get_or_compute(self, key: tuple[Hashable, ...], compute: Callable[[], bytes]) -> bytes:
        """The value kept for ``key``, or ``compute()``'s, kept if it fits the bound.

        Two threads missing the same key both compute it (it is pure and cheap next to
        a lock held while hashing); the second store replaces the first."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found[0]
        value = compute()
        cost = self.cost(key, value)
        if cost > self.max_bytes:
            return value
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= previous[1]
            self._entries[key] = (value, cost)
            self._bytes += cost
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
