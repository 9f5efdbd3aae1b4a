"""The only door to the KMS. Backends fill the underscored hooks; the public methods
hold the invariants (key length, versions, batch sizes) whatever a backend returns."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tenantvault.crypto.datakey import DATA_KEY_BYTES
from tenantvault.errors import KeyProviderError

_KEK_VERSION = re.compile(r"^[a-z]+:v([1-9][0-9]*):")


def kek_version_of(wrapped: str) -> int:
    """The KEK version a wrapped key names (``vault:v3:...`` / ``local:v3:...``)."""
    match = _KEK_VERSION.match(wrapped)
    if match is None:
        raise KeyProviderError("wrapped key has no version prefix")
    return int(match.group(1))


@dataclass(frozen=True)
class WrappedKey:
    """A data key as stored: encrypted by the KEK for one tenant."""

    ciphertext: str
    kek_version: int


@dataclass(frozen=True)
class RewrapResult:
    """One item of a batch rewrap: the new wrapping, or why it failed (no secrets)."""

    tenant_id: str
    wrapped: WrappedKey | None
    error: str | None = None


class KeyProvider(Protocol):
    """What tenantvault asks of a KMS."""

    def generate_data_key(self, tenant_id: str) -> tuple[bytes, WrappedKey]:
        """A fresh 32-byte data key for ``tenant_id``, and the same key wrapped."""
        ...

    def unwrap(self, tenant_id: str, wrapped: str) -> bytes:
        """The 32-byte data key inside ``wrapped``; only the tenant it was wrapped for works."""
        ...

    def rewrap(self, items: Sequence[tuple[str, str]]) -> list[RewrapResult]:
        """Re-wrap (tenant_id, wrapped) pairs under the latest KEK version, in batches."""
        ...

    def rotate_kek(self) -> int:
        """Make a new KEK version; returns it."""
        ...

    def kek_version(self) -> int:
        """The latest KEK version."""
        ...

    def min_decryption_version(self) -> int:
        """The oldest KEK version that may still unwrap."""
        ...

    def set_min_decryption_version(self, version: int) -> None:
        """Refuse unwrapping with KEK versions older than ``version`` from now on."""
        ...

    def mac(self, message: bytes) -> str:
        """A MAC of ``message`` under a key that never leaves the KMS (the audit key)."""
        ...

    def verify_mac(self, message: bytes, mac: str) -> bool:
        """Whether ``mac`` is this KMS's MAC of ``message``."""
        ...


class CheckedKeyProvider:
    """Public methods with invariants; subclasses implement the ``_`` hooks."""

    batch_size: int = 200

    def generate_data_key(self, tenant_id: str) -> tuple[bytes, WrappedKey]:
        plaintext, wrapped = self._generate(tenant_id)
        if len(plaintext) != DATA_KEY_BYTES:
            raise KeyProviderError("key provider returned a data key of the wrong length")
        if wrapped.kek_version < 1 or kek_version_of(wrapped.ciphertext) != wrapped.kek_version:
            raise KeyProviderError("key provider returned an inconsistent KEK version")
        return plaintext, wrapped

    def unwrap(self, tenant_id: str, wrapped: str) -> bytes:
        kek_version_of(wrapped)
        plaintext = self._unwrap(tenant_id, wrapped)
        if len(plaintext) != DATA_KEY_BYTES:
            raise KeyProviderError("key provider returned a data key of the wrong length")
        return plaintext

    def rewrap(self, items: Sequence[tuple[str, str]]) -> list[RewrapResult]:
        results: list[RewrapResult] = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            answered = self._rewrap_batch(batch)
            if len(answered) != len(batch):
                raise KeyProviderError("key provider answered a rewrap batch with the wrong count")
            for (tenant_id, _), result in zip(batch, answered, strict=True):
                if result.tenant_id != tenant_id:
                    raise KeyProviderError("key provider answered a rewrap batch out of order")
            results.extend(answered)
        return results

    def rotate_kek(self) -> int:
        return self._rotate()

    def kek_version(self) -> int:
        version = self._latest_version()
        if version < 1:
            raise KeyProviderError("key provider reported no KEK version")
        return version

    def min_decryption_version(self) -> int:
        return self._min_version()

    def set_min_decryption_version(self, version: int) -> None:
        if not 1 <= version <= self.kek_version():
            raise KeyProviderError("min_decryption_version must be 1..latest KEK version")
        self._set_min_version(version)

    def mac(self, message: bytes) -> str:
        mac = self._mac(message)
        if not isinstance(mac, str) or not mac:
            raise KeyProviderError("key provider returned no MAC")
        return mac

    def verify_mac(self, message: bytes, mac: str) -> bool:
        if not isinstance(mac, str) or not mac:
            return False
        return self._verify_mac(message, mac) is True

    def _generate(self, tenant_id: str) -> tuple[bytes, WrappedKey]:
        raise NotImplementedError

    def _mac(self, message: bytes) -> str:
        raise NotImplementedError

    def _verify_mac(self, message: bytes, mac: str) -> bool:
        raise NotImplementedError

    def _min_version(self) -> int:
        raise NotImplementedError

    def _set_min_version(self, version: int) -> None:
        raise NotImplementedError

    def _unwrap(self, tenant_id: str, wrapped: str) -> bytes:
        raise NotImplementedError

    def _rewrap_batch(self, batch: Sequence[tuple[str, str]]) -> list[RewrapResult]:
        raise NotImplementedError

    def _rotate(self) -> int:
        raise NotImplementedError

    def _latest_version(self) -> int:
        raise NotImplementedError
