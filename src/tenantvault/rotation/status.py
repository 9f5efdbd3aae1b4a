"""What every key protects: per tenant, each data key's state, KEK version and value count.

Read-only. Counting reads every sealed column once (a sequential scan of the
tenant tables), so this is an operator's command, not a health probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from tenantvault.db.operator import OperatorDatabase
from tenantvault.keys.sealed import SEALED_COLUMNS
from tenantvault.kms.provider import KeyProvider


@dataclass(frozen=True)
class DataKeyStatus:
    version: int
    state: str
    kek_version: int
    protects: int  # sealed values that name this key version


@dataclass
class TenantKeyStatus:
    tenant_id: str
    keys: list[DataKeyStatus] = field(default_factory=list)

    @property
    def active_version(self) -> int | None:
        return next((k.version for k in self.keys if k.state == "active"), None)


@dataclass
class KeyStatusReport:
    kek_latest: int
    kek_min_decryption_version: int
    tenants: list[TenantKeyStatus] = field(default_factory=list)

    @property
    def behind_kek(self) -> int:
        """Wrapped data keys (not destroyed) under an older KEK version than the latest."""
        return sum(
            1
            for t in self.tenants
            for k in t.keys
            if k.state != "destroyed" and k.kek_version < self.kek_latest
        )

    @property
    def draining(self) -> int:
        """Data keys superseded but still protecting values (a DEK rotation to finish)."""
        return sum(1 for t in self.tenants for k in t.keys if k.state == "draining")


def key_status(
    db: OperatorDatabase, provider: KeyProvider, tenants: Sequence[str] | None = None
) -> KeyStatusReport:
    """Every tenant's keys (or just ``tenants``'), with what each protects; changes nothing."""
    report = KeyStatusReport(provider.kek_version(), provider.min_decryption_version())
    only = "" if tenants is None else "WHERE tenant_id = ANY(:tenants)"
    params = {"tenants": list(tenants or [])}
    counts: dict[tuple[str, int], int] = {}
    with db.transaction() as connection:
        for column in SEALED_COLUMNS:
            name = column.column
            rows = connection.execute(
                sa.text(
                    f"SELECT tenant_id, split_part({name}, '.', 2)::int, count(*) "
                    f"FROM {db.table(column.table)} "
                    f"{only or 'WHERE true'} AND {name} IS NOT NULL GROUP BY 1, 2"
                ),
                params,
            )
            for tenant_id, version, count in rows:
                counts[(tenant_id, version)] = counts.get((tenant_id, version), 0) + int(count)
        keys = connection.execute(
            sa.text(
                f"SELECT tenant_id, version, state, kek_version "
                f"FROM {db.table('tenant_data_keys')} {only} ORDER BY tenant_id, version"
            ),
            params,
        ).all()
    by_tenant: dict[str, TenantKeyStatus] = {}
    for tenant_id, version, state, kek_version in keys:
        entry = by_tenant.setdefault(tenant_id, TenantKeyStatus(tenant_id))
        entry.keys.append(
            DataKeyStatus(version, state, kek_version, counts.get((tenant_id, version), 0))
        )
    report.tenants = list(by_tenant.values())
    return report
