"""What every key protects: per tenant, each data key's state, KEK version and value count.

Read-only. Counting reads every sealed column once (a sequential scan of the
tenant tables), so this is an operator's command, not a health probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from tenantvault.crypto.envelope import sql_dek_version, sql_is_current
from tenantvault.db.models import DataKeyState
from tenantvault.db.operator import OperatorDatabase
from tenantvault.keys import store
from tenantvault.keys.legacy import OPENS_FUNCTION, SWITCH_TABLE, sql_opens
from tenantvault.keys.sealed import SEALED_COLUMNS
from tenantvault.kms.provider import KeyProvider

# Random 96-bit nonces keep the chance of a repeat under 2**-32 up to 2**32 seals under
# one key (NIST SP 800-38D); status warns at a quarter of that, leaving years to rotate.
SEALS_WARNING = 2**30


@dataclass(frozen=True)
class DataKeyStatus:
    version: int
    state: DataKeyState
    kek_version: int
    protects: int  # sealed values that name this key version
    seals: int = 0  # values ever sealed under it (the nonce budget)
    kek_ref: str = ""  # the KEK that wraps it

    @property
    def nonce_budget_low(self) -> bool:
        return self.seals >= SEALS_WARNING


@dataclass
class TenantKeyStatus:
    tenant_id: str
    keys: list[DataKeyStatus] = field(default_factory=list)
    legacy_values: int = 0  # sealed in an older format: re-seal them (rotate-keys dek)
    refused_values: int = 0  # of those, the database refuses (not recorded at the upgrade)
    malformed_values: int = 0  # not sealed values at all (written around tenantvault)

    @property
    def active_version(self) -> int | None:
        return next((k.version for k in self.keys if k.state == DataKeyState.ACTIVE), None)


@dataclass
class KeyStatusReport:
    kek_latest: int
    kek_min_decryption_version: int
    tenants: list[TenantKeyStatus] = field(default_factory=list)
    legacy_open: bool = False  # the database's switch: older formats (recorded) open
    kek_ref: str = ""  # the deployment's KEK, whose versions the two above are

    def is_behind(self, key: DataKeyStatus) -> bool:
        """The key is wrapped (not destroyed) under an older version of the deployment's
        KEK than the latest (a tenant's own KEK is its owner's to rotate)."""
        return (
            key.state != DataKeyState.DESTROYED
            and key.kek_ref == self.kek_ref
            and key.kek_version < self.kek_latest
        )

    @property
    def behind_kek(self) -> int:
        """Wrapped data keys (not destroyed) under an older KEK version than the latest."""
        return sum(1 for t in self.tenants for k in t.keys if self.is_behind(k))

    @property
    def nonce_budget_low(self) -> int:
        """Keys past the seal warning: rotate those tenants' data keys."""
        return sum(1 for t in self.tenants for k in t.keys if k.nonce_budget_low)

    @property
    def legacy_values(self) -> int:
        """Values still in the old format, bound to their place only."""
        return sum(t.legacy_values for t in self.tenants)

    @property
    def refused_values(self) -> int:
        """Older-format values the database refuses: put in after the upgrade recorded
        what was there, or beside another config now. Reported, never re-sealed."""
        return sum(t.refused_values for t in self.tenants)

    @property
    def malformed_values(self) -> int:
        return sum(t.malformed_values for t in self.tenants)

    @property
    def draining(self) -> int:
        """Data keys superseded but still protecting values (a DEK rotation to finish)."""
        return sum(1 for t in self.tenants for k in t.keys if k.state == DataKeyState.DRAINING)


def key_status(
    db: OperatorDatabase, provider: KeyProvider, tenants: Sequence[str] | None = None
) -> KeyStatusReport:
    """Every tenant's keys (or just ``tenants``'), with what each protects; changes nothing."""
    report = KeyStatusReport(
        provider.kek_version(), provider.min_decryption_version(), kek_ref=provider.ref
    )
    only = "" if tenants is None else "t.tenant_id = ANY(:tenants) AND"
    params = {"tenants": list(tenants or [])}
    counts: dict[tuple[str, int], int] = {}
    legacy: dict[str, int] = {}
    refused: dict[str, int] = {}
    malformed: dict[str, int] = {}
    with db.transaction() as connection:
        for column in SEALED_COLUMNS:
            name = f"t.{column.column}"
            # 0: current format; 1: older, and the database lets it open; 2: older, refused.
            kind = (
                f"CASE WHEN {sql_is_current(name)} THEN 0 "
                f"WHEN {sql_opens(column, db.table(OPENS_FUNCTION))} THEN 1 ELSE 2 END"
            )
            rows = connection.execute(
                sa.text(
                    f"SELECT t.tenant_id, {sql_dek_version(name)}, {kind}, "
                    f"count(*) FROM {db.table(column.table)} t "
                    f"WHERE {only} {name} IS NOT NULL GROUP BY 1, 2, 3"
                ),
                params,
            )
            for tenant_id, version, state, count in rows:
                if version is None:  # not a sealed value: counted, never parsed
                    malformed[tenant_id] = malformed.get(tenant_id, 0) + int(count)
                    continue
                counts[(tenant_id, version)] = counts.get((tenant_id, version), 0) + int(count)
                if state:
                    legacy[tenant_id] = legacy.get(tenant_id, 0) + int(count)
                if state == 2:
                    refused[tenant_id] = refused.get(tenant_id, 0) + int(count)
        keys = store.keys_of(connection, tenants)
        report.legacy_open = legacy_formats_open(connection, db)
    by_tenant: dict[str, TenantKeyStatus] = {}
    for key in keys:
        entry = by_tenant.setdefault(key.tenant_id, TenantKeyStatus(key.tenant_id))
        protects = counts.get((key.tenant_id, key.version), 0)
        entry.keys.append(
            DataKeyStatus(key.version, key.state, key.kek_version, protects, key.seals, key.kek_ref)
        )
    for tenant_id in sorted(set(legacy) | set(malformed)):
        entry = by_tenant.setdefault(tenant_id, TenantKeyStatus(tenant_id))
        entry.legacy_values = legacy.get(tenant_id, 0)
        entry.refused_values = refused.get(tenant_id, 0)
        entry.malformed_values = malformed.get(tenant_id, 0)
    report.tenants = sorted(by_tenant.values(), key=lambda t: t.tenant_id)
    return report


def legacy_formats_open(connection: sa.Connection, db: OperatorDatabase) -> bool:
    """The database's switch: whether older-format values (recorded ones) open at all."""
    return bool(
        connection.execute(sa.text(f"SELECT legacy_open FROM {db.table(SWITCH_TABLE)}")).scalar()
    )


def close_legacy_formats_when_none_left(db: OperatorDatabase) -> bool:
    """Close the switch once no value in an older format is left in any sealed column
    (of any tenant); True if it is closed now. The application and every operator
    job read the same switch, so from then on no older value opens anywhere."""
    with db.transaction() as connection:
        if not legacy_formats_open(connection, db):
            return True
        for column in SEALED_COLUMNS:
            name = column.column
            left = connection.execute(
                sa.text(
                    f"SELECT EXISTS (SELECT FROM {db.table(column.table)} "
                    f"WHERE {name} IS NOT NULL AND NOT {sql_is_current(name)})"
                )
            ).scalar()
            if left:
                return False
        connection.execute(sa.text(f"UPDATE {db.table(SWITCH_TABLE)} SET legacy_open = false"))
        return True
