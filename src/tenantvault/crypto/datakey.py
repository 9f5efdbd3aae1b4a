"""A plaintext data key in memory: kept out of reprs, pickles and logs."""

from __future__ import annotations

from typing import NoReturn

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

DATA_KEY_BYTES = 32


class DataKey:
    """A tenant's AES-256 data key (DEK) of a given version.

    The key bytes are reachable only through :meth:`material`; ``repr`` shows
    the version, and pickling is refused so a key never lands in a cache file,
    a queue or a crash dump made by pickling.
    """

    __slots__ = ("_aead", "_material", "tenant_id", "version")

    def __init__(self, tenant_id: str, version: int, material: bytes) -> None:
        if len(material) != DATA_KEY_BYTES:
            raise ValueError("a data key is 32 bytes")
        if version < 1:
            raise ValueError("data key versions start at 1")
        self.tenant_id = tenant_id
        self.version = version
        self._material = bytes(material)
        self._aead: AESGCM | None = None

    def material(self) -> bytes:
        return self._material

    def aead(self) -> AESGCM:
        """The AES-GCM cipher of this key, made once (rotation uses it per value)."""
        if self._aead is None:
            self._aead = AESGCM(self._material)
        return self._aead

    def __repr__(self) -> str:
        return f"DataKey(tenant_id={self.tenant_id!r}, version={self.version}, material=<hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("DataKey refuses to be pickled")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataKey):
            return NotImplemented
        return (self.tenant_id, self.version, self._material) == (
            other.tenant_id,
            other.version,
            other._material,
        )

    __hash__ = None  # type: ignore[assignment]
