"""A local key provider: a master key on this machine wraps tenant data keys.

For unit tests and the embedded dev default only. It is never chosen silently:
``TENANTVAULT_KEY_PROVIDER=local`` must say so, and it then needs
``TENANTVAULT_LOCAL_MASTER_KEY``. Each KEK version and tenant gets its own
wrapping key, derived from the master key with HKDF-SHA256, so (as with Vault's
derived keys) a key wrapped for one tenant does not unwrap for another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tenantvault.crypto.datakey import DATA_KEY_BYTES
from tenantvault.errors import DecryptionError, KeyProviderError
from tenantvault.kms.provider import (
    CheckedKeyProvider,
    RewrapResult,
    UnwrapResult,
    WrappedKey,
    kek_version_of,
)


class LocalKeyProvider(CheckedKeyProvider):
    """Wraps data keys with AES-256-GCM under keys derived from one local master key."""

    def __init__(self, master_key: bytes, *, kek_version: int = 1, batch_size: int = 200) -> None:
        if len(master_key) != 32:
            raise ValueError("the local master key is 32 bytes")
        self._master = master_key
        self._latest = kek_version
        self._min = 1
        self._lock = threading.Lock()
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"LocalKeyProvider(kek_version={self._latest})"

    @property
    def ref(self) -> str:
        return "local:default"

    def __reduce__(self) -> str:
        raise TypeError("LocalKeyProvider refuses to be pickled")

    def _kek(self, version: int, tenant_id: str) -> AESGCM:
        info = f"tenantvault local kek v{version}\x00{tenant_id}".encode()
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
            self._master
        )
        return AESGCM(derived)

    def _wrap(self, tenant_id: str, plaintext: bytes, version: int) -> WrappedKey:
        nonce = os.urandom(12)
        body = self._kek(version, tenant_id).encrypt(nonce, plaintext, tenant_id.encode())
        ciphertext = f"local:v{version}:" + base64.b64encode(nonce + body).decode()
        return WrappedKey(ciphertext, version)

    def _generate(self, tenant_id: str) -> tuple[bytes, WrappedKey]:
        plaintext = os.urandom(DATA_KEY_BYTES)
        return plaintext, self._wrap(tenant_id, plaintext, self._latest)

    def _wrap_key(self, tenant_id: str, plaintext: bytes) -> WrappedKey:
        return self._wrap(tenant_id, plaintext, self._latest)

    def _unwrap(self, tenant_id: str, wrapped: str) -> bytes:
        version = kek_version_of(wrapped)
        if not wrapped.startswith("local:") or version > self._latest:
            raise KeyProviderError("wrapped key was not made by this local key provider")
        if version < self._min:
            raise DecryptionError("cannot unwrap data key: its KEK version is below the minimum")
        try:
            raw = base64.b64decode(wrapped.split(":", 2)[2], validate=True)
            return self._kek(version, tenant_id).decrypt(raw[:12], raw[12:], tenant_id.encode())
        except (InvalidTag, ValueError):
            raise DecryptionError("cannot unwrap data key") from None

    def _unwrap_batch(self, batch: Sequence[tuple[str, str]]) -> list[UnwrapResult]:
        results = []
        for tenant_id, wrapped in batch:
            try:
                results.append(UnwrapResult(tenant_id, self._unwrap(tenant_id, wrapped)))
            except (DecryptionError, KeyProviderError) as exc:
                results.append(UnwrapResult(tenant_id, error=str(exc)))
        return results

    def _rewrap_batch(self, batch: Sequence[tuple[str, str]]) -> list[RewrapResult]:
        results = []
        for tenant_id, wrapped in batch:
            try:
                plaintext = self._unwrap(tenant_id, wrapped)
            except (DecryptionError, KeyProviderError) as exc:
                results.append(RewrapResult(tenant_id, None, type(exc).__name__))
                continue
            results.append(RewrapResult(tenant_id, self._wrap(tenant_id, plaintext, self._latest)))
        return results

    def _mac_key(self) -> bytes:
        info = b"tenantvault local audit mac"
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self._master)

    def _mac(self, message: bytes) -> str:
        return "local:v1:" + hmac.new(self._mac_key(), message, hashlib.sha256).hexdigest()

    def _verify_mac(self, message: bytes, mac: str) -> bool:
        return hmac.compare_digest(self._mac(message), mac)

    def _rotate(self) -> int:
        with self._lock:
            self._latest += 1
            return self._latest

    def _latest_version(self) -> int:
        return self._latest

    def _min_version(self) -> int:
        return self._min

    def _set_min_version(self, version: int) -> None:
        with self._lock:
            self._min = version
