"""What state a tenantvault deployment is in: schema revision, isolation, transit."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import hvac
import sqlalchemy as sa
from requests.exceptions import RequestException

from tenantvault.audit.chain import audit_partitions
from tenantvault.db.models import TENANTVAULT_TABLES
from tenantvault.errors import TenantVaultError
from tenantvault.kms.factory import transit_client
from tenantvault.ops import migrate
from tenantvault.settings import Settings


@dataclass(frozen=True)
class TableStatus:
    name: str
    rows_visible_to_app_without_tenant: int
    row_level_security: bool
    forced: bool
    policies: int


@dataclass(frozen=True)
class TransitStatus:
    """Whether the KMS (Vault or OpenBao) answers and has the transit engine mounted."""

    address: str | None
    reachable: bool
    mounted: bool
    detail: str = ""


@dataclass(frozen=True)
class StatusReport:
    database: str
    server_version: str
    revision: str | None
    head: str
    tables: list[TableStatus] = field(default_factory=list)
    transit: TransitStatus | None = None
    audit_partitions_until: date | None = None  # first day no audit partition covers

    @property
    def audit_writable(self) -> bool:
        """Audit partitions exist for at least the next month (else writes will fail)."""
        if self.audit_partitions_until is None:
            return False
        today = datetime.now(UTC).date()
        return self.audit_partitions_until > (today.replace(day=1) + timedelta(days=62))

    @property
    def healthy(self) -> bool:
        """Up to date, isolated, audit partitions ahead, transit reachable."""
        return (
            self.up_to_date
            and self.isolated
            and self.audit_writable
            and bool(self.transit and self.transit.reachable)
        )

    @property
    def up_to_date(self) -> bool:
        return self.revision == self.head

    @property
    def isolated(self) -> bool:
        return len(self.tables) == len(TENANTVAULT_TABLES) and all(
            t.row_level_security
            and t.forced
            and t.policies > 0
            and t.rows_visible_to_app_without_tenant == 0
            for t in self.tables
        )


def _tables(connection: sa.Connection, settings: Settings) -> list[TableStatus]:
    schema = settings.schema_name
    rows = connection.execute(
        sa.text(
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity, "
            "(SELECT count(*) FROM pg_policies p WHERE p.schemaname = n.nspname "
            " AND p.tablename = c.relname) AS policies "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :schema AND c.relname = ANY(:tables) ORDER BY c.relname"
        ),
        {"schema": schema, "tables": list(TENANTVAULT_TABLES)},
    ).all()
    result = []
    # What the application role sees with no tenant set: must be nothing (fail closed).
    connection.execute(sa.text(f'SET LOCAL ROLE "{settings.app_role}"'))
    for name, rls, forced, policies in rows:
        visible = connection.execute(
            sa.text(f'SELECT count(*) FROM "{schema}"."{name}"')
        ).scalar_one()
        result.append(TableStatus(name, int(visible), bool(rls), bool(forced), int(policies)))
    connection.rollback()
    return result


def transit_status(settings: Settings) -> TransitStatus:
    """Whether transit answers and has its engine mounted (never raises)."""
    if settings.vault_addr is None:
        return TransitStatus(None, False, False, "VAULT_ADDR is not set")
    address = str(settings.vault_addr)
    try:
        # The same client the key provider uses: token or AppRole, TLS settings.
        client = transit_client(settings)
        mounts = client.sys.list_mounted_secrets_engines()["data"]
    except TenantVaultError as exc:
        return TransitStatus(address, False, False, str(exc))
    except (RequestException, hvac.exceptions.VaultError) as exc:
        return TransitStatus(address, False, False, type(exc).__name__)
    return TransitStatus(address, True, f"{settings.transit_mount.strip('/')}/" in mounts)


def status(settings: Settings) -> StatusReport:
    """Read the deployment's state; changes nothing."""
    with migrate.migration_engine(settings).connect() as connection:
        version = connection.execute(sa.text("SHOW server_version")).scalar_one()
        revision = migrate.current_revision(connection, settings.schema_name)
        tables = _tables(connection, settings) if revision else []
        connection.rollback()
        partitions = audit_partitions(connection, settings.schema_name) if revision else []
        until = max((upper for _, upper in partitions), default=None)
        connection.rollback()
    return StatusReport(
        database=settings.database_url_for_display(),
        server_version=str(version),
        revision=revision,
        head=migrate.head_revision(),
        tables=tables,
        transit=transit_status(settings),
        audit_partitions_until=until,
    )
