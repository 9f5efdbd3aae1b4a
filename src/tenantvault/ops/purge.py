"""Purging soft-deleted configs after their retention period (an operator job).

A deleted config keeps its sealed credentials, tokens and history, so that
``restore_config`` can bring it back whole. Once it has been deleted for longer
than the retention period, purge removes those for good — the sealed
credentials, the OAuth tokens, every kept version — and leaves the config row
as a record of what existed (its name, type, non-secret config, dates). Each
purge is one transaction per config with its ``config.purged`` audit event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from tenantvault import audit
from tenantvault.db.models import AuditAction
from tenantvault.db.operator import OperatorDatabase


@dataclass(frozen=True)
class PurgedConfig:
    tenant_id: str
    config_id: str
    tokens: int
    versions: int


@dataclass
class PurgeReport:
    dry_run: bool
    cutoff: datetime
    configs: list[PurgedConfig] = field(default_factory=list)


def purge_deleted_configs(
    db: OperatorDatabase,
    *,
    older_than: timedelta,
    dry_run: bool = False,
    now: datetime | None = None,
) -> PurgeReport:
    """Remove the secrets, tokens and history of configs deleted before ``now - older_than``."""
    if older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    cutoff = (now or datetime.now(UTC)) - older_than
    configs, tokens, versions = (
        db.table(t)
        for t in (
            "email_provider_configs",
            "email_provider_tokens",
            "email_provider_config_versions",
        )
    )
    report = PurgeReport(dry_run, cutoff)
    with db.transaction() as connection:
        due = connection.execute(
            sa.text(
                f"SELECT c.tenant_id, c.id FROM {configs} c WHERE c.deleted_at < :cutoff AND ("
                "c.encrypted_credentials IS NOT NULL "
                f"OR EXISTS (SELECT 1 FROM {tokens} t WHERE t.tenant_id = c.tenant_id "
                "AND t.config_id = c.id) "
                f"OR EXISTS (SELECT 1 FROM {versions} v WHERE v.tenant_id = c.tenant_id "
                "AND v.config_id = c.id)) ORDER BY c.tenant_id, c.id"
            ),
            {"cutoff": cutoff.astimezone(UTC).replace(tzinfo=None)},
        ).all()
    for tenant_id, config_id in due:
        keys = {"t": tenant_id, "c": config_id}
        with db.transaction() as connection:
            # Re-checked under the row lock: a restore meanwhile wins.
            still_deleted = connection.execute(
                sa.text(
                    f"SELECT 1 FROM {configs} WHERE tenant_id = :t AND id = :c "
                    "AND deleted_at < :cutoff FOR UPDATE"
                ),
                {**keys, "cutoff": cutoff.astimezone(UTC).replace(tzinfo=None)},
            ).first()
            if still_deleted is None:
                continue
            where = "WHERE tenant_id = :t AND config_id = :c"
            if dry_run:
                gone_tokens = connection.execute(
                    sa.text(f"SELECT count(*) FROM {tokens} {where}"), keys
                ).scalar_one()
                gone_versions = connection.execute(
                    sa.text(f"SELECT count(*) FROM {versions} {where}"), keys
                ).scalar_one()
            else:
                connection.execute(
                    sa.text(
                        f"UPDATE {configs} SET encrypted_credentials = NULL "
                        "WHERE tenant_id = :t AND id = :c"
                    ),
                    keys,
                )
                gone_tokens = connection.execute(
                    sa.text(f"DELETE FROM {tokens} {where}"), keys
                ).rowcount
                gone_versions = connection.execute(
                    sa.text(f"DELETE FROM {versions} {where}"), keys
                ).rowcount
                audit.record(
                    connection,
                    tenant_id,
                    AuditAction.CONFIG_PURGED,
                    actor="purge",
                    target_type="config",
                    target_id=config_id,
                    details={"tokens": gone_tokens, "versions": gone_versions},
                )
            report.configs.append(
                PurgedConfig(tenant_id, config_id, int(gone_tokens), int(gone_versions))
            )
    return report
