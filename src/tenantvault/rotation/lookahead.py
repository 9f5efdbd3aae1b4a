"""The tenants of a DEK rotation, handed to its workers one at a time, with the key
provider's part of the tenants next in line asked for ahead.

Rotating a tenant waits twice on the key provider: for its new data key, and to
unwrap the key being drained. In line, that is about 5 ms of a 1,000-value
tenant's 34 ms. So:

- **new keys**: when a worker takes a tenant, the next tenant's new key is asked
  for by a thread of its own, while the worker re-seals. The provider is asked
  before that tenant is claimed or locked, as the rotation itself asks before its
  switch; a key whose tenant turns out busy, or resumed, is dropped unused (it
  wraps nothing and was never stored).
- **current keys**: the worker that takes the first tenant of each window first
  unwraps the usable keys of the whole window in batch requests (the warm-up of
  :mod:`tenantvault.keys.warmup`, one read by the migrator), so each tenant's
  drained key is a cache hit.

Nothing here is an error of its own: a prefetch that failed leaves the tenant's
rotation to ask the provider in line, where it fails as it would have without the
lookahead. A new key asked for ahead may be older than a KEK rotation that ran
meanwhile: the switch then refuses it and asks again (:func:`keys.store.switch`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from tenantvault.keys.keyring import Keyring, NewKey
from tenantvault.keys.warmup import Transaction


class Lookahead:
    """The rotation's queue of tenants; thread-safe, shared by its workers."""

    def __init__(
        self,
        tenants: Sequence[str],
        keyring: Keyring,
        transaction: Transaction,
        *,
        new_keys: bool,
        warm: bool,
    ) -> None:
        """Hand out ``tenants`` in order.

        Args:
            tenants: checked tenant ids.
            keyring: makes the new keys and warms the current ones.
            transaction: the migrator's transactions (the window's keys are read in one).
            new_keys: ask for the next tenant's new key ahead.
            warm: unwrap each window's current keys in batches ahead.
        """
        self._tenants = list(tenants)
        self._keyring = keyring
        self._transaction = transaction
        self._taken = 0
        self._lock = threading.Lock()
        self._asked: dict[str, Future[NewKey]] = {}
        self._maker = (
            ThreadPoolExecutor(1, thread_name_prefix="rotate-dek-new-key") if new_keys else None
        )
        self._window = keyring.warm_window() if warm else 0
        self._warmed_to = 0  # tenants before this index had their window warmed

    def __len__(self) -> int:
        return len(self._tenants)

    def take(self) -> tuple[str, NewKey | None] | None:
        """The next tenant and, if one was asked for ahead, its new key; None at the end."""
        with self._lock:
            index = self._taken
            if index >= len(self._tenants):
                return None
            self._taken += 1
            tenant_id = self._tenants[index]
            asked = self._asked.pop(tenant_id, None)
            if self._maker is not None and index + 1 < len(self._tenants):
                following = self._tenants[index + 1]
                self._asked[following] = self._maker.submit(self._keyring.new_key, following)
            window: list[str] = []
            if self._window and index >= self._warmed_to:
                window = self._tenants[index : index + self._window]
                self._warmed_to = index + self._window
        if window:
            self._warm(window)
        return tenant_id, self._answer(asked)

    def _warm(self, window: list[str]) -> None:
        """Unwrap the window's usable keys into the cache, as far as that goes.

        Best effort: a key that does not unwrap, transit down, a database error, leave
        the keys to be unwrapped in line, where the failure is reported as without
        the lookahead."""
        with contextlib.suppress(Exception):
            self._keyring.warm_usable(self._transaction, window)

    @staticmethod
    def _answer(asked: Future[NewKey] | None) -> NewKey | None:
        if asked is None:
            return None
        try:
            return asked.result()
        except Exception:  # asked again in line, where the failure is reported
            return None

    def close(self) -> None:
        """Drop the keys asked for and not taken (a stopped run); wait for the thread."""
        with self._lock:
            self._taken = len(self._tenants)
            for asked in self._asked.values():
                asked.cancel()
            self._asked.clear()
        if self._maker is not None:
            self._maker.shutdown(wait=True)
