"""Sealing values with AES-256-GCM under a tenant data key. Knows nothing of SQL.

Wire format, an ASCII string::

    tv3.<dek_version>.<base64url(nonce[12] || ciphertext || tag[16])>

``dek_version`` is a decimal without leading zeros (1 .. 2**31-1). The header
(``tv3.<dek_version>.``) is authenticated: it is part of the associated data,
together with the value's place — tenant id, ``table.column`` and row id — and
its binding: what else the value belongs with (``keys/sealed.py``: a config's
credentials, its type, version and a digest of its non-secret config; a token,
its row and version and its config's type and digest). Each part is
length-prefixed, so no two places encode alike. A value copied to another row,
column or tenant, put back after its row moved on to a newer version, served
beside a rewritten or retyped config, or with an edited header, fails to open.
Overhead: 28 bytes of nonce and tag, base64-encoded, plus a header of ~6
characters.

Older formats: format 1 (``tv1.``) bound the place only; format 2 (``tv2.``)
bound credentials to their config's version and digest but not its type, and
tokens to their row only (``SealContext.legacy_binding``). Sealing always
writes format 3; key rotation re-seals older values; whether they still open is
the deployment's decision (``allow_legacy`` for format 1; a format-2 value opens
only where the caller gives its legacy binding).
"""

from __future__ import annotations

import binascii
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from tenantvault.crypto.datakey import DataKey
from tenantvault.errors import DecryptionError

CURRENT_FORMAT = 3
LEGACY_FORMAT = 1
# Format 2 bound values as SealContext.legacy_binding says (no type; tokens to their row).
BOUND_FORMAT_2 = 2
FORMATS = (LEGACY_FORMAT, BOUND_FORMAT_2, CURRENT_FORMAT)
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_DEK_VERSION = 2**31 - 1
_SEALED = re.compile(r"^tv([123])\.([1-9][0-9]{0,9})\.([A-Za-z0-9_-]+)$")
# The same shape, for the database (a CHECK constraint, and queries that must pass
# over a malformed value instead of failing on it).
SQL_PATTERN = r"^tv[123]\.[1-9][0-9]{0,9}\.[A-Za-z0-9_-]+$"


def _length_prefixed(part: bytes) -> bytes:
    return struct.pack(">I", len(part)) + part


_LABELS = {
    LEGACY_FORMAT: _length_prefixed(b"tenantvault.sealed.v1"),
    BOUND_FORMAT_2: _length_prefixed(b"tenantvault.sealed.v2"),
    CURRENT_FORMAT: _length_prefixed(b"tenantvault.sealed.v3"),
}


@dataclass(frozen=True)
class SealContext:
    """Where a sealed value lives, and what it is bound to; both go into its
    associated data. ``binding`` is empty for a value bound to its place only.
    ``legacy_binding``: what a format-2 value of this place was bound to; None
    refuses format-2 values here."""

    tenant_id: str
    table: str
    column: str
    row_id: str
    binding: bytes = b""
    legacy_binding: bytes | None = None

    def associated_data(self, prefix: str, fmt: int = CURRENT_FORMAT) -> bytes:
        # Built in one join: a context lives for one open on the hot path, so caching
        # its parts would cost more than making them.
        parts = [
            _LABELS[fmt],
            _length_prefixed(prefix.encode()),
            _length_prefixed(self.tenant_id.encode()),
            _length_prefixed(f"{self.table}.{self.column}".encode()),
            _length_prefixed(self.row_id.encode()),
        ]
        if fmt == CURRENT_FORMAT:
            parts.append(_length_prefixed(self.binding))
        elif fmt == BOUND_FORMAT_2:
            parts.append(_length_prefixed(self.legacy_binding or b""))
        return b"".join(parts)


def header(dek_version: int, fmt: int = CURRENT_FORMAT) -> str:
    """The header of every value sealed under ``dek_version`` (``tv3.<dek_version>.``):
    a value names that key exactly when it starts with this."""
    if not 1 <= dek_version <= MAX_DEK_VERSION:
        raise ValueError("dek_version out of range")
    return f"tv{fmt}.{dek_version}."


def sql_dek_version(column: str) -> str:
    """A PostgreSQL expression for the DEK version a sealed value in ``column`` names,
    NULL for a malformed value (for counting values per key without reading them into
    Python). ``column`` is an identifier of ours, never input."""
    return f"CASE WHEN {column} ~ '{SQL_PATTERN}' THEN split_part({column}, '.', 2)::bigint END"


def like_patterns(dek_versions: Iterable[int]) -> list[str]:
    """LIKE patterns that match exactly the values naming one of ``dek_versions``, in
    either format (a prefix test: cheaper per row than parsing the version)."""
    return [f"{header(v, fmt)}%" for v in dek_versions for fmt in FORMATS]


def is_current_format(sealed: str) -> bool:
    """Whether ``sealed`` names the current format (a prefix test; a malformed value
    that does is refused when opened)."""
    return sealed.startswith(f"tv{CURRENT_FORMAT}.")


def sql_is_current(column: str) -> str:
    """A PostgreSQL condition: the value in ``column`` is in the current format."""
    return f"starts_with({column}, 'tv{CURRENT_FORMAT}.')"


def seal(
    key: DataKey, plaintext: bytes, context: SealContext, *, nonce: bytes | None = None
) -> str:
    """Encrypt ``plaintext`` under ``key`` for ``context``, in the current format.

    Args:
        key: the tenant's data key; its version goes into the header.
        plaintext: the bytes to protect.
        context: the value's tenant, table, column, row and binding.
        nonce: only for known-answer tests; normally 96 fresh random bits.
    """
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    if len(nonce) != NONCE_BYTES:
        raise ValueError("nonce must be 12 bytes")
    prefix = header(key.version)
    return _seal_with(key, prefix, nonce, plaintext, context.associated_data(prefix))


def _seal_with(key: DataKey, prefix: str, nonce: bytes, plaintext: bytes, associated: bytes) -> str:
    body = key.aead().encrypt(nonce, plaintext, associated)
    return prefix + _encoded(nonce + body)


def _parse(sealed: str) -> tuple[int, int, str]:
    """(format, DEK version, base64 body) of a well-formed sealed value."""
    match = _SEALED.fullmatch(sealed) if isinstance(sealed, str) else None
    if match is None:
        raise DecryptionError("cannot open sealed value")
    version = int(match.group(2))
    if version > MAX_DEK_VERSION:
        raise DecryptionError("cannot open sealed value")
    return int(match.group(1)), version, match.group(3)


def open_with_key_of(
    key_of: Callable[[int], DataKey | None],
    sealed: str,
    context: SealContext,
    *,
    allow_legacy: bool = True,
) -> bytes | None:
    """:func:`open_sealed` with the key ``key_of`` gives for the version the value
    names, parsed once; None when it gives none (a cache without that key).

    Raises:
        DecryptionError: as :func:`open_sealed`.
    """
    fmt, version, encoded = _parse(sealed)
    key = key_of(version)
    return None if key is None else _open(key, fmt, version, encoded, context, allow_legacy)


def sealed_dek_version(sealed: str) -> int:
    """The data key version a sealed value names (to fetch that key).

    Raises:
        DecryptionError: the value is not a well-formed sealed value.
    """
    return _parse(sealed)[1]


def open_sealed(
    key: DataKey, sealed: str, context: SealContext, *, allow_legacy: bool = True
) -> bytes:
    """Decrypt a value made by :func:`seal` for the same ``context``.

    Args:
        allow_legacy: open format-1 values too (bound to their place only).

    Raises:
        DecryptionError: wrong key, wrong place or binding, a refused legacy value,
            or any change to the value.
    """
    fmt, version, encoded = _parse(sealed)
    return _open(key, fmt, version, encoded, context, allow_legacy)


def reseal(
    sealed: str,
    context: SealContext,
    key_of: Callable[[int], DataKey],
    new_key: DataKey,
    *,
    allow_legacy: bool = True,
) -> str:
    """Open ``sealed`` with the key its header names (``key_of(version)``) and seal the
    plaintext again under ``new_key`` for the same place, in the current format: one
    parse, for key rotation.

    Raises:
        DecryptionError: as :func:`open_sealed`.
    """
    resealer = Resealer(
        context.tenant_id,
        context.table,
        context.column,
        key_of,
        new_key,
        allow_legacy=allow_legacy,
    )
    return resealer.reseal(sealed, context.row_id, context.binding, context.legacy_binding)


class Resealer:
    """:func:`reseal` for many values of one tenant's column (key rotation): the parts
    of their associated data they all share (label, header, tenant, table and column)
    are built once per key version, not twice per value."""

    __slots__ = (
        "_allow_legacy",
        "_heads",
        "_key_of",
        "_new_key",
        "_place",
        "_prefix",
        "_sealing",
    )

    def __init__(
        self,
        tenant_id: str,
        table: str,
        column: str,
        key_of: Callable[[int], DataKey],
        new_key: DataKey,
        *,
        allow_legacy: bool = True,
    ) -> None:
        self._place = _length_prefixed(tenant_id.encode()) + _length_prefixed(
            f"{table}.{column}".encode()
        )
        self._key_of = key_of
        self._new_key = new_key
        self._prefix = header(new_key.version)
        self._sealing = self._head(CURRENT_FORMAT, new_key.version)
        self._heads: dict[tuple[int, int], bytes] = {}
        self._allow_legacy = allow_legacy

    def _head(self, fmt: int, version: int) -> bytes:
        """The associated data up to the row id (what :meth:`SealContext.associated_data`
        puts first)."""
        return _LABELS[fmt] + _length_prefixed(header(version, fmt).encode()) + self._place

    def reseal(
        self, sealed: str, row_id: str, binding: bytes, legacy_binding: bytes | None = None
    ) -> str:
        """``sealed``, of the row ``row_id`` bound to ``binding`` (a format-2 value: to
        ``legacy_binding``), sealed again in the current format.

        Raises:
            DecryptionError: as :func:`open_sealed`; and what ``key_of`` raises.
        """
        fmt, version, encoded = _parse(sealed)
        head = self._heads.get((fmt, version))
        if head is None:
            head = self._heads[(fmt, version)] = self._head(fmt, version)
        row = _length_prefixed(row_id.encode())
        bound = row + _length_prefixed(binding)
        if fmt == BOUND_FORMAT_2:
            if legacy_binding is None:
                raise DecryptionError("cannot open sealed value")
            opened = head + row + _length_prefixed(legacy_binding)
        else:
            opened = head + (bound if fmt == CURRENT_FORMAT else row)
        key = self._key_of(version)
        plaintext = _open_with(key, fmt, version, encoded, opened, self._allow_legacy)
        nonce = os.urandom(NONCE_BYTES)
        return _seal_with(self._new_key, self._prefix, nonce, plaintext, self._sealing + bound)


# URL-safe base64 through binascii directly: base64's wrappers cost as much again.
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _encoded(raw: bytes) -> str:
    """``raw`` as unpadded URL-safe base64."""
    return binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


def _decoded(encoded: str) -> bytes:
    """The bytes of an unpadded URL-safe base64 body (its alphabet already checked).

    Raises:
        DecryptionError: it does not decode, or is not the one encoding of its bytes
            (a non-canonical tail: the same value must have one text).
    """
    data = encoded.encode("ascii")
    try:
        raw = binascii.a2b_base64(data.translate(_FROM_URLSAFE) + b"=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        raise DecryptionError("cannot open sealed value") from None
    if binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE).rstrip(b"=") != data:
        raise DecryptionError("cannot open sealed value")
    return raw


def _open(
    key: DataKey, fmt: int, version: int, encoded: str, context: SealContext, allow_legacy: bool
) -> bytes:
    if fmt == BOUND_FORMAT_2 and context.legacy_binding is None:
        raise DecryptionError("cannot open sealed value")
    return _open_with(
        key, fmt, version, encoded, context.associated_data(header(version, fmt), fmt), allow_legacy
    )


def _open_with(
    key: DataKey, fmt: int, version: int, encoded: str, associated: bytes, allow_legacy: bool
) -> bytes:
    if version != key.version or (fmt == LEGACY_FORMAT and not allow_legacy):
        raise DecryptionError("cannot open sealed value")
    raw = _decoded(encoded)
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionError("cannot open sealed value")
    try:
        return key.aead().decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], associated)
    except InvalidTag:
        raise DecryptionError("cannot open sealed value") from None
