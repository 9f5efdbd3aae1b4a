"""What every key protects: per tenant, each data key's state, KEK version and value count.

Read-only. Counting reads every sealed column once (a sequential scan of the
tenant tables), so this is an operator's command, not a health probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from tenantvault.crypto.envelope import sql_dek_version
from tenantvault.db.models import DataKeyState
from tenantvault.db.operator import OperatorDatabase
from tenantvault.keys import store
from tenantvault.keys.sealed import SEALED_COLUMNS
from tenantvault.kms.provider import KeyProvider


@dataclass(frozen=True)
class DataKeyStatus:
    version: int
    state: DataKeyState
    kek_version: int
    protects: int  # sealed values that name this key version


@dataclass
class TenantKeyStatus:
    tenant_id: str
    keys: list[DataKeyStatus] = field(default_factory=list)

    @property
    def active_version(self) -> int | None:
        return next((k.version for k in self.keys if k.state == DataKeyState.ACTIVE), None)


@dataclass
class KeyStatusReport:
    kek_latest: int
    kek_min_decryption_version: int
    tenants: list[TenantKeyStatus] = field(default_factory=list)

    def is_behind(self, key: DataKeyStatus) -> bool:
        """The key is wrapped (not destroyed) under an older KEK version than the latest."""
        return key.state != DataKeyState.DESTROYED and key.kek_version < self.kek_latest

    @property
    def behind_kek(self) -> int:
        """Wrapped data keys (not destroyed) under an older KEK version than the latest."""
        return sum(1 for t in self.tenants for k in t.keys if self.is_behind(k))

    @property
    def draining(self) -> int:
        """Data keys superseded but still protecting values (a DEK rotation to finish)."""
        return sum(1 for t in self.tenants for k in t.keys if k.state == DataKeyState.DRAINING)


def key_status(
    db: OperatorDatabase, provider: KeyProvider, tenants: Sequence[str] | None = None
) -> KeyStatusReport:
    """Every tenant's keys (or just ``tenants``'), with what each protects; changes nothing."""
    report = KeyStatusReport(provider.kek_version(), provider.min_decryption_version())
    only = "" if tenants is None else "tenant_id = ANY(:tenants) AND"
    params = {"tenants": list(tenants or [])}
    counts: dict[tuple[str, int], int] = {}
    with db.transaction() as connection:
        for column in SEALED_COLUMNS:
            name = column.column
            rows = connection.execute(
                sa.text(
                    f"SELECT tenant_id, {sql_dek_version(name)}, count(*) "
                    f"FROM {db.table(column.table)} "
                    f"WHERE {only} {name} IS NOT NULL GROUP BY 1, 2"
                ),
                params,
            )
            for tenant_id, version, count in rows:
                counts[(tenant_id, version)] = counts.get((tenant_id, version), 0) + int(count)
        keys = store.keys_of(connection, tenants)
    by_tenant: dict[str, TenantKeyStatus] = {}
    for key in keys:
        entry = by_tenant.setdefault(key.tenant_id, TenantKeyStatus(key.tenant_id))
        protects = counts.get((key.tenant_id, key.version), 0)
        entry.keys.append(DataKeyStatus(key.version, key.state, key.kek_version, protects))
    report.tenants = list(by_tenant.values())
    return report
