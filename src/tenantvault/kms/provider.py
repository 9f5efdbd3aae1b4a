"""The only door to the KMS. Backends fill the underscored hooks; the public methods
hold the invariants (key length, versions, batch sizes) whatever a backend returns."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from tenantvault.crypto.datakey import DATA_KEY_BYTES
from tenantvault.errors import DecryptionError, KeyProviderError

_KEK_VERSION = re.compile(r"^[a-z]+:v([1-9][0-9]*):")
_NO_VERSION = "wrapped key has no version prefix"


def kek_version_of(wrapped: str) -> int:
    """The KEK version a wrapped key names (``vault:v3:...`` / ``local:v3:...``)."""
    match = _KEK_VERSION.match(wrapped)
    if match is None:
        raise KeyProviderError(_NO_VERSION)
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


@dataclass(frozen=True)
class UnwrapResult:
    """One item of a batch unwrap: the data key, or why it did not unwrap (no secrets).

    A failed item is that item's own: a tampered wrapping, or one made for another
    tenant. A KMS that cannot be reached fails the whole call instead."""

    tenant_id: str
    plaintext: bytes | None = field(default=None, repr=False)
    error: str | None = None


@dataclass(frozen=True)
class KmsStatus:
    """What ``tenantvault status`` shows of the configured KMS, whichever it is.

    A check this caller could not make leaves ``key_versions`` None with a
    ``key_detail`` that starts with "not checked:"; a key that is not there (or
    cannot wrap) one that starts with "missing:"."""

    kind: str  # the status line's label: "transit", "aws kms"
    address: str | None
    reachable: bool
    ready: bool  # transit: its engine mounted; AWS KMS: the key enabled and usable
    detail: str = ""  # why it is not reachable, as a phrase: "unreachable (no connection)"
    # The KEK versions that can unwrap: (min_decryption_version, latest).
    key_versions: tuple[int, int] | None = None
    key_detail: str = ""
    summary: str = ""  # what follows "reachable, " on the status line
    key_label: str = "the KEK"  # how messages name the key: "the transit key"


def _named(wrapped: str) -> bool:
    """Whether ``wrapped`` names its KEK version (what every wrapping starts with)."""
    return _KEK_VERSION.match(wrapped) is not None


_Answer = TypeVar("_Answer", UnwrapResult, RewrapResult)


def _in_order(
    what: str, batch: Sequence[tuple[str, str]], answered: list[_Answer]
) -> list[_Answer]:
    """``answered``, checked to hold one result per item of ``batch``, in its order."""
    if len(answered) != len(batch):
        raise KeyProviderError(f"key provider answered a {what} batch with the wrong count")
    for (tenant_id, _), result in zip(batch, answered, strict=True):
        if result.tenant_id != tenant_id:
            raise KeyProviderError(f"key provider answered a {what} batch out of order")
    return answered


class KeyProvider(Protocol):
    """What tenantvault asks of one KEK in a KMS."""

    @property
    def ref(self) -> str:
        """This KEK as a key reference (``transit:<key>``, ``awskms:<key id>``)."""
        ...

    @property
    def batch_size(self) -> int:
        """How many items one request to the KMS carries (batch unwrap and rewrap)."""
        ...

    def generate_data_key(self, tenant_id: str) -> tuple[bytes, WrappedKey]:
        """A fresh 32-byte data key for ``tenant_id``, and the same key wrapped."""
        ...

    def wrap(self, tenant_id: str, plaintext: bytes) -> WrappedKey:
        """A data key made elsewhere, wrapped by this KEK for ``tenant_id`` (moving a
        tenant's keys from one KEK to another)."""
        ...

    def unwrap(self, tenant_id: str, wrapped: str) -> bytes:
        """The 32-byte data key inside ``wrapped``; only the tenant it was wrapped for works."""
        ...

    def check_usable(self) -> None:
        """Raise unless this KEK wraps and unwraps now, for one tenant only.

        Raises:
            KeyProviderError: the key is missing, refused, or does not bind the tenant.
        """
        ...

    def unwrap_many(self, items: Sequence[tuple[str, str]]) -> list[UnwrapResult]:
        """Unwrap (tenant_id, wrapped) pairs in requests of at most ``batch_size`` items,
        a result per item in order; an item that does not unwrap fails only itself.

        Raises:
            KeyProviderUnavailable, KeyProviderRefused: the KMS did not serve a request.
        """
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


# Tenants of the usability probe: no tenant id has a space (db/session.py), and a KMS's
# context may refuse control bytes (AWS's encryption context is printable text).
PROBE_TENANTS = ("tenantvault probe a", "tenantvault probe b")


class CheckedKeyProvider:
    """Public methods with invariants; subclasses implement the ``_`` hooks."""

    batch_size: int = 200

    @property
    def ref(self) -> str:
        raise NotImplementedError

    def wrap(self, tenant_id: str, plaintext: bytes) -> WrappedKey:
        if len(plaintext) != DATA_KEY_BYTES:
            raise ValueError("a data key is 32 bytes")
        wrapped = self._wrap_key(tenant_id, plaintext)
        if wrapped.kek_version < 1 or kek_version_of(wrapped.ciphertext) != wrapped.kek_version:
            raise KeyProviderError("key provider returned an inconsistent KEK version")
        return wrapped

    def check_usable(self) -> None:
        plaintext, wrapped = self.generate_data_key(PROBE_TENANTS[0])
        try:
            opened = self.unwrap(PROBE_TENANTS[0], wrapped.ciphertext)
        except DecryptionError:
            raise KeyProviderError(f"{self.ref} does not unwrap what it wrapped") from None
        if opened != plaintext:
            raise KeyProviderError(f"{self.ref} does not unwrap what it wrapped")
        try:
            self.unwrap(PROBE_TENANTS[1], wrapped.ciphertext)
        except DecryptionError:
            return  # refused for another tenant: the key binds the tenant
        raise KeyProviderError(
            f"{self.ref} unwraps one tenant's key for another: it does not bind the tenant "
            "(a transit key must be created with derived=true)"
        )

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

    def unwrap_many(self, items: Sequence[tuple[str, str]]) -> list[UnwrapResult]:
        results: list[UnwrapResult] = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            # A wrapping without a version prefix is refused here, as unwrap refuses it;
            # it is that item's failure, and the others still go to the KMS.
            sendable = [(tenant_id, wrapped) for tenant_id, wrapped in batch if _named(wrapped)]
            answered = iter(_in_order("unwrap", sendable, self._unwrap_batch(sendable)))
            for tenant_id, wrapped in batch:
                if not _named(wrapped):
                    results.append(UnwrapResult(tenant_id, error=_NO_VERSION))
                    continue
                result = next(answered)
                if result.plaintext is not None and len(result.plaintext) != DATA_KEY_BYTES:
                    raise KeyProviderError("key provider returned a data key of the wrong length")
                results.append(result)
        return results

    def rewrap(self, items: Sequence[tuple[str, str]]) -> list[RewrapResult]:
        results: list[RewrapResult] = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            results.extend(_in_order("rewrap", batch, self._rewrap_batch(batch)))
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

    def _wrap_key(self, tenant_id: str, plaintext: bytes) -> WrappedKey:
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

    def _unwrap_batch(self, batch: Sequence[tuple[str, str]]) -> list[UnwrapResult]:
        raise NotImplementedError

    def _rewrap_batch(self, batch: Sequence[tuple[str, str]]) -> list[RewrapResult]:
        raise NotImplementedError

    def _rotate(self) -> int:
        raise NotImplementedError

    def _latest_version(self) -> int:
        raise NotImplementedError
