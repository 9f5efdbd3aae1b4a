"""Sealing values with AES-256-GCM under a tenant data key. Knows nothing of SQL.

Wire format (version 1), an ASCII string::

    tv1.<dek_version>.<base64url(nonce[12] || ciphertext || tag[16])>

``dek_version`` is a decimal without leading zeros (1 .. 2**31-1). The header
(``tv1.<dek_version>.``) is authenticated: it is part of the associated data,
together with the value's place — tenant id, ``table.column`` and row id —
each length-prefixed so no two places encode alike. A value copied to another
row, column or tenant, or with an edited header, fails to open. Overhead: 28
bytes of nonce and tag, base64-encoded, plus a header of ~6 characters.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from cryptography.exceptions import InvalidTag

from tenantvault.crypto.datakey import DataKey
from tenantvault.errors import DecryptionError

FORMAT_PREFIX = "tv1"
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_DEK_VERSION = 2**31 - 1
_SEALED = re.compile(r"^tv1\.([1-9][0-9]{0,9})\.([A-Za-z0-9_-]+)$")
_AAD_LABEL = b"tenantvault.sealed.v1"


@dataclass(frozen=True)
class SealContext:
    """Where a sealed value lives; bound into its associated data."""

    tenant_id: str
    table: str
    column: str
    row_id: str

    def associated_data(self, header: str) -> bytes:
        return _LABEL + _length_prefixed(header.encode()) + self._place

    @cached_property
    def _place(self) -> bytes:
        # The part after the header, made once per context: a re-seal uses it twice.
        return (
            _length_prefixed(self.tenant_id.encode())
            + _length_prefixed(f"{self.table}.{self.column}".encode())
            + _length_prefixed(self.row_id.encode())
        )


def _length_prefixed(part: bytes) -> bytes:
    return struct.pack(">I", len(part)) + part


_LABEL = _length_prefixed(_AAD_LABEL)


def header(dek_version: int) -> str:
    """The header of every value sealed under ``dek_version`` (``tv1.<dek_version>.``):
    a value names that key exactly when it starts with this."""
    if not 1 <= dek_version <= MAX_DEK_VERSION:
        raise ValueError("dek_version out of range")
    return f"{FORMAT_PREFIX}.{dek_version}."


def sql_dek_version(column: str) -> str:
    """A PostgreSQL expression for the DEK version a sealed value in ``column`` names
    (for counting values per key without reading them into Python). ``column`` is
    an identifier of ours, never input."""
    return f"split_part({column}, '.', 2)::int"


def seal(
    key: DataKey, plaintext: bytes, context: SealContext, *, nonce: bytes | None = None
) -> str:
    """Encrypt ``plaintext`` under ``key`` for ``context``.

    Args:
        key: the tenant's data key; its version goes into the header.
        plaintext: the bytes to protect.
        context: the value's tenant, table, column and row.
        nonce: only for known-answer tests; normally 96 fresh random bits.
    """
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    if len(nonce) != NONCE_BYTES:
        raise ValueError("nonce must be 12 bytes")
    prefix = header(key.version)
    body = key.aead().encrypt(nonce, plaintext, context.associated_data(prefix))
    return prefix + base64.urlsafe_b64encode(nonce + body).decode().rstrip("=")


def _parse(sealed: str) -> tuple[int, str]:
    """(DEK version, base64 body) of a well-formed sealed value."""
    match = _SEALED.fullmatch(sealed) if isinstance(sealed, str) else None
    if match is None:
        raise DecryptionError("cannot open sealed value")
    version = int(match.group(1))
    if version > MAX_DEK_VERSION:
        raise DecryptionError("cannot open sealed value")
    return version, match.group(2)


def sealed_dek_version(sealed: str) -> int:
    """The data key version a sealed value names (to fetch that key).

    Raises:
        DecryptionError: the value is not a well-formed sealed value.
    """
    return _parse(sealed)[0]


def open_sealed(key: DataKey, sealed: str, context: SealContext) -> bytes:
    """Decrypt a value made by :func:`seal` for the same ``context``.

    Raises:
        DecryptionError: wrong key, wrong place, or any change to the value.
    """
    version, encoded = _parse(sealed)
    return _open(key, version, encoded, context)


def reseal(
    sealed: str, context: SealContext, key_of: Callable[[int], DataKey], new_key: DataKey
) -> str:
    """Open ``sealed`` with the key its header names (``key_of(version)``) and seal the
    plaintext again under ``new_key`` for the same place: one parse, for key rotation.

    Raises:
        DecryptionError: as :func:`open_sealed`.
    """
    version, encoded = _parse(sealed)
    return seal(new_key, _open(key_of(version), version, encoded, context), context)


def _open(key: DataKey, version: int, encoded: str, context: SealContext) -> bytes:
    if version != key.version:
        raise DecryptionError("cannot open sealed value")
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise DecryptionError("cannot open sealed value") from None
    # Re-encoding must give the same text: rejects non-canonical base64 tails.
    if base64.urlsafe_b64encode(raw).decode().rstrip("=") != encoded:
        raise DecryptionError("cannot open sealed value")
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionError("cannot open sealed value")
    try:
        return key.aead().decrypt(
            raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.associated_data(header(version))
        )
    except InvalidTag:
        raise DecryptionError("cannot open sealed value") from None
