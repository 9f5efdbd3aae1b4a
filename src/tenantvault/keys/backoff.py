"""No stampede on a failing key provider: after a failed call, unwraps back off.

While Vault is down (or refuses the token), every cache miss would otherwise make
its own request, each waiting out the timeout and its retries: a burst of misses
becomes a burst of requests to a server that is already failing, and every caller
waits seconds to learn what the first already knew. After a call fails that way,
the gate stays shut for a window — doubling with each failure in a row, jittered
(so processes that failed together do not return together), capped — and every
unwrap fails at once without a call. Once the window has passed, one call (the
probe) goes through; the others keep failing fast until it is answered. Any
answer reopens the gate (a ciphertext that does not open is Vault working); a
failure shuts it for a longer window.

Concurrent misses of the same key already share one call (the cache's single
flight); this gate covers every key, and every later miss.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tenantvault.errors import DecryptionError, KeyProviderRefused, KeyProviderUnavailable

OUTAGE = (KeyProviderUnavailable, KeyProviderRefused)
"""The failures that shut the gate: the provider unreachable, or refusing the caller."""


@dataclass(frozen=True)
class _Ticket:
    """One admitted call: the outage round it started in, and whether it is the probe."""

    round: int
    probe: bool


class ProviderBackoff:
    """A gate before the key provider's unwraps, shut for a while after each outage."""

    def __init__(
        self,
        *,
        initial_seconds: float = 1.0,
        max_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """A gate whose first window lasts ``initial_seconds``, doubling per failure in
        a row up to ``max_seconds``; each window is drawn from its upper half.

        Args:
            clock: seconds, monotonic (tests move it).
            jitter: a number in [0, 1) per window (tests pin it).
        """
        if not 0 < initial_seconds <= max_seconds:
            raise ValueError("backoff needs 0 < initial_seconds <= max_seconds")
        self.initial_seconds = initial_seconds
        self.max_seconds = max_seconds
        self._clock = clock
        self._jitter = jitter
        self._lock = threading.Lock()
        self._failures = 0  # in a row; 0: the gate is open
        self._round = 0  # counts recorded failures, so a round's stragglers count once
        self._failed_at = 0.0
        self._retry_at = 0.0
        self._probing = False
        self._reason = ""

    def __repr__(self) -> str:
        return f"ProviderBackoff(failures={self._failures})"

    @contextmanager
    def call(self, what: str) -> Iterator[None]:
        """Around one call to the key provider (``what``: "unwrap a data key"): refused at
        once while the gate is shut; its outcome opens or shuts the gate.

        Raises:
            KeyProviderUnavailable: the provider failed recently and its window has not
                passed, or the probe is under way; no call was made. The message says
                when it failed, why, and when it is tried again (no secrets: the
                provider's own message names only its address).
        """
        ticket = self._admit(what)
        try:
            yield
        except OUTAGE as exc:
            self._failed(ticket, str(exc))
            raise
        except DecryptionError:
            self._answered(ticket)  # the provider answered: one ciphertext does not open
            raise
        except BaseException:
            self._abandoned(ticket)  # cancelled, or a fault of our own: nothing learnt
            raise
        self._answered(ticket)

    def _admit(self, what: str) -> _Ticket:
        with self._lock:
            if self._failures == 0:
                return _Ticket(self._round, probe=False)
            now = self._clock()
            if self._probing or now < self._retry_at:
                raise KeyProviderUnavailable(self._refusal(what, now))
            self._probing = True
            return _Ticket(self._round, probe=True)

    def _refusal(self, what: str, now: float) -> str:
        when = (
            "a retry is under way" if self._probing else f"next try in {self._retry_at - now:.1f}s"
        )
        return (
            f"could not {what}: the key provider (transit) failed {now - self._failed_at:.1f}s "
            f"ago ({self._failures} in a row), so keys not cached fail at once until its "
            f"backoff ends; {when}. It failed with: {self._reason}"
        )

    def _failed(self, ticket: _Ticket, reason: str) -> None:
        with self._lock:
            if ticket.round != self._round:
                return  # a call from before the recorded failure: the same outage
            self._failures += 1
            self._round += 1
            self._probing = False
            self._reason = reason
            self._failed_at = self._clock()
            self._retry_at = self._failed_at + self._window()

    def _window(self) -> float:
        ceiling = min(self.max_seconds, self.initial_seconds * 2.0 ** min(self._failures - 1, 32))
        return ceiling * (0.5 + self._jitter() / 2)

    def _answered(self, ticket: _Ticket) -> None:
        with self._lock:
            if ticket.round == self._round:
                self._failures = 0
                self._probing = False

    def _abandoned(self, ticket: _Ticket) -> None:
        with self._lock:
            if ticket.probe and ticket.round == self._round:
                self._probing = False  # the next caller probes instead
