"""An hvac adapter that sends each request to a cluster's nodes in turn until one answers.

Every request of an ``hvac.Client`` (transit, logins, ``status``) goes through its
adapter, so failover lives here and nowhere else: the key provider's retries and the
backoff gate above it see a failure only when no node answered, and so count the
cluster, not one node, as down.

A node that refuses the connection, or answers 503 (sealed, or a standby that knows
no active node), is skipped for the next; the node that answered last is tried first
next time. After a switch, the adapter asks the node that answered which node is
active (``sys/leader``) and prefers it: OpenBao's standbys answer reads from their
own copy of the storage, which may not yet hold a write just made (a new transit key
version), while the active node always does; the first request looks it up too. A
standby forwards what it cannot serve to the active node, so any listed node will do
when the active one is unknown.

A request that timed out is not sent again (it may have been done: a key rotated);
the next request starts at the next node.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import hvac
import requests
from hvac.adapters import JSONAdapter

_SKIPPED = (requests.exceptions.ConnectionError, hvac.exceptions.VaultDown)


class FailoverAdapter(JSONAdapter):  # type: ignore[misc]  # hvac ships no types
    """hvac's JSON adapter over several nodes of one cluster (``nodes``: their URLs)."""

    def __init__(self, *args: Any, nodes: Sequence[str], **kwargs: Any) -> None:
        if not nodes:
            raise ValueError("a cluster needs at least one node")
        self.nodes = tuple(str(node).rstrip("/") for node in nodes)
        self._preferred = 0
        self._settled = False  # whether the active node was looked up yet
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

    def request(self, *args: Any, **kwargs: Any) -> Any:
        first = self._preferred
        for step in range(len(self.nodes)):
            index = (first + step) % len(self.nodes)
            self._local.node = self.nodes[index]
            try:
                response = super().request(*args, **kwargs)
            except _SKIPPED:
                if step == len(self.nodes) - 1:
                    raise  # no node answered: the caller's retry and backoff decide
                continue
            except requests.exceptions.Timeout:
                self._preferred = (index + 1) % len(self.nodes)
                raise
            finally:
                self._local.node = None
            if index != first or not self._settled:
                self._settled = True
                self._preferred = self._leader(index)
            return response
        raise AssertionError("unreachable")  # the loop returns or raises

    def _leader(self, answered: int) -> int:
        """The index of the active node as node ``answered`` knows it (itself if unsure)."""
        try:
            leader = self.session.get(
                f"{self.nodes[answered]}/v1/sys/leader", **self._kwargs
            ).json()
        except (requests.exceptions.RequestException, ValueError):
            return answered
        address = str(leader.get("leader_address") or "").rstrip("/")
        return self.nodes.index(address) if address in self.nodes else answered
