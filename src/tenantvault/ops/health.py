"""What state a tenantvault deployment is in: schema revision, isolation, the KMS."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from tenantvault.audit.chain import audit_partitions
from tenantvault.db.failures import server_message
from tenantvault.db.models import TENANTVAULT_TABLES
from tenantvault.errors import ConfigurationError, KeyProviderError
from tenantvault.keys import store
from tenantvault.kms.factory import kek_resolver
from tenantvault.kms.health import kms_status
from tenantvault.kms.provider import KmsStatus
from tenantvault.ops import migrate
from tenantvault.settings import Settings


@dataclass(frozen=True)
class TableStatus:
    name: str
    # None: not checked (this login may not SET ROLE to the app role; visibility_detail).
    rows_visible_to_app_without_tenant: int | None
    row_level_security: bool
    forced: bool
    policies: int


@dataclass(frozen=True)
class StatusReport:
    """What ``tenantvault status`` found. A check this login could not make has its
    value None and a ``*_detail`` that starts with "not checked:"; the report is then
    not healthy, since what was not checked was not shown to hold."""

    database: str
    server_version: str
    revision: str | None
    head: str
    revision_detail: str = ""
    visibility_detail: str = ""
    tables: list[TableStatus] = field(default_factory=list)
    kms: KmsStatus | None = None
    audit_partitions_until: date | None = None  # first day no audit partition covers
    # The lowest and highest KEK version live data keys are wrapped under (None: no live
    # key, or not checked, and then wrapped_detail says why).
    wrapped_kek_versions: tuple[int, int] | None = None
    wrapped_detail: str = ""
    # Tenants' own KEKs (customer-managed keys) that do not wrap and unwrap now, one line
    # each naming the tenants and why; tenant_keks_detail says when they were not read.
    tenant_kek_problems: list[str] = field(default_factory=list)
    tenant_keks_checked: int = 0
    tenant_keks_detail: str = ""

    @property
    def kek_problem(self) -> str | None:
        """Why some data key cannot be unwrapped by the KMS key, if one cannot: a KEK
        version the key does not have (a dev server that lost its keys, a restore of
        the database without its transit key), one below min_decryption_version, or a
        key that is gone or disabled."""
        if self.wrapped_kek_versions is None or self.kms is None:
            return None
        low, high = self.wrapped_kek_versions
        key = self.kms.key_label
        if self.kms.key_versions is None:
            if self.kms.key_detail.startswith("missing"):
                return f"data keys are wrapped under KEK v{low}..v{high}; {self.kms.key_detail}"
            return None
        minimum, latest = self.kms.key_versions
        if high > latest:
            return (
                f"data keys name KEK v{high}; {key} has versions only up to "
                f"v{latest}: they cannot be unwrapped (was {key} lost or restored "
                "from an older backup?)"
            )
        if low < minimum:
            return (
                f"data keys are wrapped under KEK v{low}, below {key}'s "
                f"min_decryption_version {minimum}: run `tenantvault rotate-keys kek "
                "--no-rotate` after lowering it"
            )
        return None

    @property
    def audit_writable(self) -> bool:
        """Audit partitions exist for at least the next month (else writes will fail)."""
        if self.audit_partitions_until is None:
            return False
        today = datetime.now(UTC).date()
        return self.audit_partitions_until > (today.replace(day=1) + timedelta(days=62))

    @property
    def healthy(self) -> bool:
        """Up to date, isolated, audit partitions ahead, the KMS reachable, and every
        live data key unwrappable by its key."""
        return (
            self.up_to_date
            and self.isolated
            and self.audit_writable
            and bool(self.kms and self.kms.reachable)
            and self.kek_problem is None
            and not self.wrapped_detail.startswith("not checked")
            and not self.tenant_kek_problems
            and not self.tenant_keks_detail.startswith("not checked")
            # Live keys against a KMS key this caller may not read: not shown to unwrap.
            and not (
                self.wrapped_kek_versions is not None
                and self.kms is not None
                and self.kms.key_detail.startswith("not checked")
            )
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


def _tables(connection: sa.Connection, settings: Settings) -> tuple[list[TableStatus], str]:
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
    # What the application role sees with no tenant set: must be nothing (fail closed).
    try:
        connection.execute(sa.text(f'SET LOCAL ROLE "{settings.app_role}"'))
        visible: dict[str, int | None] = {
            name: int(
                connection.execute(
                    sa.text(f'SELECT count(*) FROM "{schema}"."{name}"')
                ).scalar_one()
            )
            for name, *_ in rows
        }
        detail = ""
    except DBAPIError as exc:
        visible, detail = dict.fromkeys((name for name, *_ in rows), None), _not_checked(exc)
    finally:
        connection.rollback()
    tables = [
        TableStatus(name, visible[name], bool(rls), bool(forced), int(policies))
        for name, rls, forced, policies in rows
    ]
    return tables, detail


def _not_checked(exc: DBAPIError) -> str:
    return f"not checked: {server_message(exc) or type(exc.orig).__name__}"


def _wrapped_kek_versions(
    connection: sa.Connection, settings: Settings
) -> tuple[tuple[int, int] | None, str]:
    """Read as the migrator role: row-level security shows it every tenant's keys."""
    try:
        connection.execute(sa.text(f'SET LOCAL ROLE "{settings.migrator_role}"'))
        return store.kek_versions_in_use(connection, settings.default_kek_ref), ""
    except DBAPIError as exc:
        return None, _not_checked(exc)
    finally:
        connection.rollback()


def _tenant_keks(connection: sa.Connection, settings: Settings) -> tuple[list[str], int, str]:
    """Each tenant KEK in use, probed once with this deployment's credentials: the
    problems (tenants and why), how many KEKs were probed, and why none was read."""
    try:
        connection.execute(sa.text(f'SET LOCAL ROLE "{settings.migrator_role}"'))
        own = store.tenant_keks(connection, None)
    except DBAPIError as exc:
        return [], 0, _not_checked(exc)
    finally:
        connection.rollback()
    by_ref: dict[str, list[str]] = {}
    for tenant_id, ref in sorted(own.items()):
        by_ref.setdefault(ref, []).append(tenant_id)
    resolve = kek_resolver(settings, lambda kek: kek)
    problems = []
    for ref, tenants in by_ref.items():
        try:
            resolve(ref).check_usable()
        except (KeyProviderError, ConfigurationError) as exc:
            problems.append(f"tenant {', '.join(tenants)}: KEK {ref}: {exc}")
    return problems, len(by_ref), ""


def status(settings: Settings) -> StatusReport:
    """Read the deployment's state; changes nothing."""
    with migrate.migration_engine(settings).connect() as connection:
        version = connection.execute(sa.text("SHOW server_version")).scalar_one()
        try:
            revision, revision_detail = (
                migrate.current_revision(connection, settings.schema_name),
                "",
            )
        except DBAPIError as exc:  # the app login may not read alembic_version
            revision, revision_detail = None, _not_checked(exc)
        connection.rollback()
        installed = revision is not None or bool(revision_detail)
        tables, visibility_detail = _tables(connection, settings) if installed else ([], "")
        partitions = audit_partitions(connection, settings.schema_name) if installed else []
        until = max((upper for _, upper in partitions), default=None)
        connection.rollback()
        wrapped, wrapped_detail = (
            _wrapped_kek_versions(connection, settings) if installed else (None, "")
        )
        problems, probed, keks_detail = (
            _tenant_keks(connection, settings) if installed else ([], 0, "")
        )
    return StatusReport(
        database=settings.database_url_for_display(),
        server_version=str(version),
        revision=revision,
        head=migrate.head_revision(),
        revision_detail=revision_detail,
        visibility_detail=visibility_detail,
        tables=tables,
        kms=kms_status(settings),
        audit_partitions_until=until,
        wrapped_kek_versions=wrapped,
        wrapped_detail=wrapped_detail,
        tenant_kek_problems=problems,
        tenant_keks_checked=probed,
        tenant_keks_detail=keks_detail,
    )
