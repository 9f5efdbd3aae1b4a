"""The data-key cache: bounded by age, uses and entries; one load per cold key."""

from __future__ import annotations

import threading
import time

import pytest

from tenantvault.crypto.datakey import DataKey
from tenantvault.keys.cache import DataKeyCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def key(tenant: str = "t", version: int = 1) -> DataKey:
    return DataKey(tenant, version, bytes(32))


def test_an_entry_expires_after_max_age() -> None:
    clock = Clock()
    cache = DataKeyCache(max_age_seconds=10, max_entries=10, max_uses=100, clock=clock)
    cache.put(key())
    clock.now = 9.9
    assert cache.get("t", 1) == key()
    clock.now = 10.0
    assert cache.get("t", 1) is None


def test_an_entry_serves_at_most_max_uses() -> None:
    cache = DataKeyCache(max_age_seconds=60, max_entries=10, max_uses=3)
    cache.put(key())  # the put counts as the first use
    assert cache.get("t", 1) is not None
    assert cache.get("t", 1) is not None
    assert cache.get("t", 1) is None


def test_the_least_recently_used_entry_goes_first() -> None:
    cache = DataKeyCache(max_age_seconds=60, max_entries=2, max_uses=100)
    cache.put(key("a"))
    cache.put(key("b"))
    cache.get("a", 1)
    cache.put(key("c"))
    assert cache.get("b", 1) is None
    assert cache.get("a", 1) is not None
    assert cache.get("c", 1) is not None


def test_concurrent_misses_share_one_load() -> None:
    cache = DataKeyCache(max_age_seconds=60, max_entries=10, max_uses=10_000)
    calls = []
    gate = threading.Event()

    def load() -> DataKey:
        calls.append(1)
        gate.wait(5)
        return key()

    results: list[DataKey] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_load("t", 1, load)))
        for _ in range(16)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert len(calls) == 1
    assert results == [key()] * 16
    assert cache.stats.loads == 1


def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    cache = DataKeyCache(max_age_seconds=60, max_entries=10, max_uses=100)

    def fail() -> DataKey:
        raise RuntimeError("provider down")

    with pytest.raises(RuntimeError):
        cache.get_or_load("t", 1, fail)
    assert cache.get_or_load("t", 1, key) == key()


def test_evicting_a_tenant_drops_only_its_keys() -> None:
    cache = DataKeyCache(max_age_seconds=60, max_entries=10, max_uses=100)
    cache.put(key("a", 1))
    cache.put(key("a", 2))
    cache.put(key("b", 1))
    cache.evict_tenant("a")
    assert (cache.get("a", 1), cache.get("a", 2)) == (None, None)
    assert cache.get("b", 1) is not None
