"""Every column that holds sealed values, the place each value is bound to, and what
else it is bound to.

The one list both the facade (sealing and opening) and key rotation (re-sealing,
counting what each data key protects) read, so a new sealed column cannot be
forgotten by one of them.

Bindings (format 3): a config's credentials, live and kept in history, are bound
to the config's provider type, the row's version and a digest of its non-secret
config; a config's OAuth tokens to the token row (its id and version) and to the
type and digest of the config they belong to. So no secret opens beside a config
it was not sealed with — rewritten, retyped, or moved on to a newer version — and
a token is never served beside a config whose host, authority or token endpoint
was rewritten. A legitimate config change re-seals the config's tokens in its
own transaction.

Format 2 bound credentials to version and digest only, and tokens to their row
only: ``legacy_binding`` is that binding, for opening and re-sealing values stored
before format 3.
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


def config_digest(config: Mapping[str, Any]) -> bytes:
    """SHA-256 of a config's canonical encoding."""
    return hashlib.sha256(canonical_config(config)).digest()


BINDING_CACHE_MAX_BYTES = 4 * 1024 * 1024
"""What the hot path's cache of config digests may hold: 4 MiB (about 10,000 typical
configs, or 60 of the largest a config may be)."""
_DIGESTS = ByteBoundedCache(BINDING_CACHE_MAX_BYTES)


def stored_config_digest(config_json: str) -> bytes:
    """:func:`config_digest` of a config as the database prints it (``jsonb::text``).

    The load hot path reads that text instead of a decoded dict: the same row prints
    the same text, so its digest is computed once per process, not decoded and
    re-encoded on every load. The cache of non-secret configs is bounded by the bytes
    it holds (:data:`BINDING_CACHE_MAX_BYTES`), whatever the configs' sizes."""
    return _DIGESTS.get_or_compute((config_json,), lambda: config_digest(json.loads(config_json)))


def binding_cache() -> ByteBoundedCache:
    """The process's cache of :func:`stored_config_digest` (to read its size)."""
    return _DIGESTS


def _type_name(kind: object) -> str:
    # A ProviderType (a str enum) or the text the database returns: its value either way.
    return str(getattr(kind, "value", kind))


def credentials_binding(kind: object, version: int, digest: bytes) -> bytes:
    """What a config's credentials are bound to: its type, version and config digest."""
    return f"config:{_type_name(kind)}:{version}:".encode() + digest


def credentials_binding_v2(kind: object, version: int, digest: bytes) -> bytes:
    """Format 2's binding of credentials: version and config digest, no type."""
    return f"config:{version}:".encode() + digest


def token_binding(row_id: str, version: int, kind: object, digest: bytes) -> bytes:
    """What a config's OAuth tokens are bound to: the token row (a new grant after a
    delete is a new row, whose versions start again), its version, and the type and
    digest of the config the tokens are used with."""
    return f"token:{row_id}:{version}:{_type_name(kind)}:".encode() + digest


def token_binding_v2(row_id: str, version: int, kind: object, digest: bytes) -> bytes:
    """Format 2's binding of tokens: their row and version only."""
    return f"token:{row_id}:{version}".encode()


@dataclass(frozen=True)
class SealedColumn:
    """A text column of sealed values in a tenant table.

    ``keys`` name a row within its tenant, in the order of an index that starts
    with ``tenant_id`` (rotation pages through them); joined with ``:`` they are
    the row id in the value's associated data. ``bound_to`` are SQL expressions
    over the row (``t``) and its config (``c``, joined by ``config_join``; none
    when the row is the config), and ``config`` the expression of the config whose
    digest the value is bound to; ``binding`` (and format 2's ``legacy_binding``)
    turn their values and that digest into the rest of the associated data.
    """

    table: str
    column: str
    keys: tuple[tuple[str, str], ...]  # (column, SQL type)
    bound_to: tuple[str, ...]
    config: str
    config_join: str | None
    binding: Callable[..., bytes]
    legacy_binding: Callable[..., bytes]

    def place(
        self, tenant_id: str, *key_values: object, bound: tuple[Any, ...], config: Mapping[str, Any]
    ) -> SealContext:
        """The context of a value in the row named by ``key_values``, whose
        ``bound_to`` values are ``bound`` and whose config is ``config``."""
        return self.place_digest(tenant_id, *key_values, bound=bound, digest=config_digest(config))

    def place_digest(
        self, tenant_id: str, *key_values: object, bound: tuple[Any, ...], digest: bytes
    ) -> SealContext:
        """:meth:`place`, with the config's digest already taken (the hot path caches it)."""
        return SealContext(
            tenant_id,
            self.table,
            self.column,
            self.row_id(*key_values),
            self.binding(*bound, digest),
            self.legacy_binding(*bound, digest),
        )

    @staticmethod
    def row_id(*key_values: object) -> str:
        """The row id in a value's associated data: the row's ``keys``, joined with ``:``."""
        return ":".join(map(str, key_values))

    def sql_row_id(self, alias: str) -> str:
        """:meth:`row_id` as an SQL expression over the row ``alias`` (its ``keys`` as
        text, joined with ``:``)."""
        return " || ':' || ".join(f"{alias}.{key}::text" for key, _ in self.keys)

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


CONFIG_TABLE = EmailProviderConfig.__tablename__  # what ``config_join`` joins as c
_BY_CONFIG_ID = "c.tenant_id = t.tenant_id AND c.id = t.config_id"

CONFIG_CREDENTIALS = SealedColumn(
    EmailProviderConfig.__tablename__,
    "encrypted_credentials",
    (("id", "text"),),
    ("t.type", "t.version"),
    "t.config",
    None,
    credentials_binding,
    credentials_binding_v2,
)
# One token row per config: the config id names the row for good.
ACCESS_TOKEN = SealedColumn(
    EmailProviderToken.__tablename__,
    "encrypted_access_token",
    (("config_id", "text"),),
    ("t.id", "t.version", "c.type"),
    "c.config",
    _BY_CONFIG_ID,
    token_binding,
    token_binding_v2,
)
REFRESH_TOKEN = SealedColumn(
    EmailProviderToken.__tablename__,
    "encrypted_refresh_token",
    (("config_id", "text"),),
    ("t.id", "t.version", "c.type"),
    "c.config",
    _BY_CONFIG_ID,
    token_binding,
    token_binding_v2,
)
# The version is in the row id too: a kept secret cannot be swapped into another version.
# The type is the config's (it never changes; a history row keeps none), the digest the
# kept version's own config.
VERSION_CREDENTIALS = SealedColumn(
    EmailProviderConfigVersion.__tablename__,
    "encrypted_credentials",
    (("config_id", "text"), ("version", "integer")),
    ("c.type", "t.version"),
    "t.config",
    _BY_CONFIG_ID,
    credentials_binding,
    credentials_binding_v2,
)

SEALED_COLUMNS = (CONFIG_CREDENTIALS, ACCESS_TOKEN, REFRESH_TOKEN, VERSION_CREDENTIALS)
