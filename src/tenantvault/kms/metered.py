"""A key provider whose every call is counted and timed (:mod:`tenantvault.metrics`).

It wraps whatever provider a vault is given (transit, the local one, an
application's own), so the calls are measured in one place whichever it is, with
the operation's name and its outcome, never its arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

from tenantvault.kms.provider import KeyProvider, RewrapResult, UnwrapResult, WrappedKey
from tenantvault.metrics import Metrics


class MeteredKeyProvider:
    """``inner``'s methods, each recorded as a key provider call on ``metrics``."""

    def __init__(self, inner: KeyProvider, metrics: Metrics) -> None:
        self.inner = inner
        self._metrics = metrics

    def __repr__(self) -> str:
        return f"MeteredKeyProvider({self.inner!r})"

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    @property
    def ref(self) -> str:
        return self.inner.ref

    def wrap(self, tenant_id: str, plaintext: bytes) -> WrappedKey:
        return self._metrics.provider_call("wrap", lambda: self.inner.wrap(tenant_id, plaintext))

    def check_usable(self) -> None:
        self._metrics.provider_call("check_usable", self.inner.check_usable)

    def generate_data_key(self, tenant_id: str) -> tuple[bytes, WrappedKey]:
        return self._metrics.provider_call(
            "generate", lambda: self.inner.generate_data_key(tenant_id)
        )

    def unwrap(self, tenant_id: str, wrapped: str) -> bytes:
        return self._metrics.provider_call("unwrap", lambda: self.inner.unwrap(tenant_id, wrapped))

    def unwrap_many(self, items: Sequence[tuple[str, str]]) -> list[UnwrapResult]:
        return self._metrics.provider_call("unwrap_many", lambda: self.inner.unwrap_many(items))

    def rewrap(self, items: Sequence[tuple[str, str]]) -> list[RewrapResult]:
        return self._metrics.provider_call("rewrap", lambda: self.inner.rewrap(items))

    def rotate_kek(self) -> int:
        return self._metrics.provider_call("rotate_kek", self.inner.rotate_kek)

    def kek_version(self) -> int:
        return self._metrics.provider_call("kek_version", self.inner.kek_version)

    def min_decryption_version(self) -> int:
        return self._metrics.provider_call(
            "min_decryption_version", self.inner.min_decryption_version
        )

    def set_min_decryption_version(self, version: int) -> None:
        self._metrics.provider_call(
            "set_min_decryption_version", lambda: self.inner.set_min_decryption_version(version)
        )

    def mac(self, message: bytes) -> str:
        return self._metrics.provider_call("mac", lambda: self.inner.mac(message))

    def verify_mac(self, message: bytes, mac: str) -> bool:
        return self._metrics.provider_call(
            "verify_mac", lambda: self.inner.verify_mac(message, mac)
        )
