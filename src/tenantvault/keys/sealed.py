"""Every column that holds sealed values, and the place each value is bound to.

The one list both the facade (sealing and opening) and key rotation (re-sealing,
counting what each data key protects) read, so a new sealed column cannot be
forgotten by one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tenantvault.crypto.envelope import SealContext
from tenantvault.db.models import (
    EmailProviderConfig,
    EmailProviderConfigVersion,
    EmailProviderToken,
)


@dataclass(frozen=True)
class SealedColumn:
    """A text column of sealed values in a tenant table.

    ``keys`` name a row within its tenant, in the order of an index that starts
    with ``tenant_id`` (rotation pages through them); joined with ``:`` they are
    the row id in the value's associated data.
    """

    table: str
    column: str
    keys: tuple[tuple[str, str], ...]  # (column, SQL type)

    def place(self, tenant_id: str, *key_values: object) -> SealContext:
        return SealContext(tenant_id, self.table, self.column, ":".join(map(str, key_values)))

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


CONFIG_CREDENTIALS = SealedColumn(
    EmailProviderConfig.__tablename__, "encrypted_credentials", (("id", "text"),)
)
# One token row per config: the config id names the row for good.
ACCESS_TOKEN = SealedColumn(
    EmailProviderToken.__tablename__, "encrypted_access_token", (("config_id", "text"),)
)
REFRESH_TOKEN = SealedColumn(
    EmailProviderToken.__tablename__, "encrypted_refresh_token", (("config_id", "text"),)
)
# Bound to the version too: a kept secret cannot be swapped into another version.
VERSION_CREDENTIALS = SealedColumn(
    EmailProviderConfigVersion.__tablename__,
    "encrypted_credentials",
    (("config_id", "text"), ("version", "integer")),
)

SEALED_COLUMNS = (CONFIG_CREDENTIALS, ACCESS_TOKEN, REFRESH_TOKEN, VERSION_CREDENTIALS)
