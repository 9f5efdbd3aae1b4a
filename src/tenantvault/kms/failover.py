"""An hvac adapter that sends each request to a cluster's nodes in turn until one answers.

Every request of an ``hvac.Client`` (transit, logins, ``status``) goes through its
adapter, so failover lives here and nowhere else: the key provider's retries and the
backoff gate above it see a failure only when no node answered, and so count the
cluster, not one node, as down.

A node that refuses the connection, or answers 503 (sealed, or a standby that knows
no active node), is skipped for the next; the node that answered last is tried first
next time. Before its first request, and the first after a switch, the adapter asks
which node is active (each node's ``sys/health``) and prefers it: OpenBao's standbys answer reads
from their own copy of the storage, which may not yet hold a write just made (a new
transit key version: read on a standby at once, it may be missing), while the active
node always does. A standby forwards what it cannot serve to the active node, so any
listed node will do when the active one is unknown.

During an election a standby may still hold an old copy of a transit key (OpenBao
caches them): so reads (a key's versions, which decide whether a rotation rotates)
go to the active node only, and fail while none is (retried inside the timeout by
the key provider); encrypt, decrypt and rewrap, all POSTs, go to any node.

A request that timed out is not sent again (it may have been done: a key rotated);
the next request starts at the next node.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import hvac
import requests
from hvac.adapters import JSONAdapter

# Reads of settings (a transit key's versions) decide what a rotation does: they go
# to the active node only, or fail (as a sealed node does: the caller retries).
_MUST_BE_CURRENT = frozenset({"get", "list"})
# How often, at most, the active node is looked for while none is known (an election).
LOOKUP_INTERVAL = 0.5
_SKIPPED = (requests.exceptions.ConnectionError, hvac.exceptions.VaultDown)


class NoActiveNodeError(hvac.exceptions.VaultDown):  # type: ignore[misc]
    """Every node that answered is a standby (or sealed): an election is under way."""


class FailoverAdapter(JSONAdapter):  # type: ignore[misc]  # hvac ships no types
    """hvac's JSON adapter over several nodes of one cluster (``nodes``: their URLs)."""

    def __init__(self, *args: Any, nodes: Sequence[str], **kwargs: Any) -> None:
        if not nodes:
            raise ValueError("a cluster needs at least one node")
        self.nodes = tuple(str(node).rstrip("/") for node in nodes)
        self._preferred = 0
        # Whether the active node was looked up since the last switch (one node: moot).
        self._settled = len(self.nodes) == 1
        self._looked_at = -LOOKUP_INTERVAL
        self._local = threading.local()  # the node of the request this thread sends
        super().__init__(*args, **kwargs)

    @property
    def base_uri(self) -> str:
        """The node the current request goes to, else the one tried first."""
        return getattr(self._local, "node", None) or self.nodes[self._preferred]

    @base_uri.setter
    def base_uri(self, value: str) -> None:
        # hvac's constructor (and Client.url) set it: a listed node becomes the first.
        value = str(value).rstrip("/")
        if value in self.nodes:
            self._preferred = self.nodes.index(value)

    def request(self, method: str, *args: Any, **kwargs: Any) -> Any:
        current = method.lower() in _MUST_BE_CURRENT
        answered = True
        if not self._settled and (current or time.monotonic() - self._looked_at >= LOOKUP_INTERVAL):
            answered = self._find_active()
        if current and not self._settled and answered:
            raise NoActiveNodeError("no node of the cluster is active")
        first = self._preferred
        tries = 1 if current else len(self.nodes)
        for step in range(tries):
            index = (first + step) % len(self.nodes)
            self._local.node = self.nodes[index]
            try:
                response = super().request(method, *args, **kwargs)
            except _SKIPPED:
                self._settled = len(self.nodes) == 1  # else look for the active node again
                if step == tries - 1:
                    raise  # no node answered: the caller's retry and backoff decide
                continue
            except requests.exceptions.Timeout:
                self._preferred = (index + 1) % len(self.nodes)
                self._settled = len(self.nodes) == 1
                raise
            finally:
                self._local.node = None
            if index != first:
                self._preferred = index
            return response
        raise AssertionError("unreachable")  # the loop returns or raises

    def _find_active(self) -> bool:
        """Prefer the node that says it is active (``sys/health`` answers 200). None
        does during an election: asked again on a request LOOKUP_INTERVAL later.
        Returns whether any node answered."""
        self._looked_at = time.monotonic()
        answered = False
        for step in range(len(self.nodes)):
            index = (self._preferred + step) % len(self.nodes)
            try:
                health = self.session.head(f"{self.nodes[index]}/v1/sys/health", **self._kwargs)
            except requests.exceptions.RequestException:
                continue
            answered = True
            if health.status_code == 200:
                self._preferred = index
                self._settled = True
                return True
        return answered
