"""Every column that holds sealed values, the place each value is bound to, and what
else it is bound to.

The one list both the facade (sealing and opening) and key rotation (re-sealing,
counting what each data key protects) read, so a new sealed column cannot be
forgotten by one of them.

Bindings: a config's credentials (live and kept in history) are bound to that
row's version and a digest of its non-secret config, so they never open beside a
config they were not sealed with, nor after the row moved on to a newer version.
OAuth tokens are bound to the token row's id and version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tenantvault.crypto.envelope import SealContext
from tenantvault.db.models import (
    EmailProviderConfig,
    EmailProviderConfigVersion,
    EmailProviderToken,
)
from tenantvault.keys.bindingcache import ByteBoundedCache

# Made once: json.dumps with options builds an encoder per call, as long as the encoding
# itself for a small config (key rotation encodes every credentials row's config).
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_config(config: Mapping[str, Any]) -> bytes:
    """The one encoding of a config that its digest is taken over: sorted keys, no
    spaces, UTF-8 (the same dict always encodes alike, however it was stored)."""
    return _CANONICAL.encode(config).encode()


def config_binding(version: int, config: Mapping[str, Any]) -> bytes:
    """What a config's credentials are bound to: its version and its config's digest."""
    return f"config:{version}:".encode() + hashlib.sha256(canonical_config(config)).digest()


BINDING_CACHE_MAX_BYTES = 4 * 1024 * 1024
"""What the hot path's cache of config bindings may hold: 4 MiB (about 10,000 typical
configs, or 60 of the largest a config may be)."""
_BINDINGS = ByteBoundedCache(BINDING_CACHE_MAX_BYTES)


def stored_config_binding(version: int, config_json: str) -> bytes:
    """:func:`config_binding` of a config as the database prints it (``jsonb::text``).

    The load hot path reads that text instead of a decoded dict: the same row prints
    the same text, so its digest is computed once per process, not decoded and
    re-encoded on every load. The cache of non-secret configs is bounded by the bytes
    it holds (:data:`BINDING_CACHE_MAX_BYTES`), whatever the configs' sizes."""
    return _BINDINGS.get_or_compute(
        (version, config_json), lambda: config_binding(version, json.loads(config_json))
    )


def binding_cache() -> ByteBoundedCache:
    """The process's cache of :func:`stored_config_binding` (to read its size)."""
    return _BINDINGS


def token_binding(row_id: str, version: int) -> bytes:
    """What a config's OAuth tokens are bound to: the token row (a new grant after a
    delete is a new row, whose versions start again) and its version."""
    return f"token:{row_id}:{version}".encode()


@dataclass(frozen=True)
class SealedColumn:
    """A text column of sealed values in a tenant table.

    ``keys`` name a row within its tenant, in the order of an index that starts
    with ``tenant_id`` (rotation pages through them); joined with ``:`` they are
    the row id in the value's associated data. ``bound_to`` are the row's columns
    that ``binding`` turns into the rest of the associated data.
    """

    table: str
    column: str
    keys: tuple[tuple[str, str], ...]  # (column, SQL type)
    bound_to: tuple[str, ...]
    binding: Callable[..., bytes]

    def place(self, tenant_id: str, *key_values: object, bound: tuple[Any, ...]) -> SealContext:
        """The context of a value in the row named by ``key_values``, whose
        ``bound_to`` columns hold ``bound``."""
        return self.place_bound(tenant_id, *key_values, binding=self.binding(*bound))

    def place_bound(self, tenant_id: str, *key_values: object, binding: bytes) -> SealContext:
        """:meth:`place`, with the binding already made (the hot path caches it)."""
        return SealContext(tenant_id, self.table, self.column, self.row_id(*key_values), binding)

    @staticmethod
    def row_id(*key_values: object) -> str:
        """The row id in a value's associated data: the row's ``keys``, joined with ``:``."""
        return ":".join(map(str, key_values))

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


CONFIG_CREDENTIALS = SealedColumn(
    EmailProviderConfig.__tablename__,
    "encrypted_credentials",
    (("id", "text"),),
    ("version", "config"),
    config_binding,
)
# One token row per config: the config id names the row for good.
ACCESS_TOKEN = SealedColumn(
    EmailProviderToken.__tablename__,
    "encrypted_access_token",
    (("config_id", "text"),),
    ("id", "version"),
    token_binding,
)
REFRESH_TOKEN = SealedColumn(
    EmailProviderToken.__tablename__,
    "encrypted_refresh_token",
    (("config_id", "text"),),
    ("id", "version"),
    token_binding,
)
# The version is in the row id too: a kept secret cannot be swapped into another version.
VERSION_CREDENTIALS = SealedColumn(
    EmailProviderConfigVersion.__tablename__,
    "encrypted_credentials",
    (("config_id", "text"), ("version", "integer")),
    ("version", "config"),
    config_binding,
)

SEALED_COLUMNS = (CONFIG_CREDENTIALS, ACCESS_TOKEN, REFRESH_TOKEN, VERSION_CREDENTIALS)
