"""Provider usage statistics: per-day sent/failed counters and last use, per config.

``record_usage`` is one upsert (``INSERT ... ON CONFLICT DO UPDATE SET sent =
sent + excluded.sent``): many concurrent senders, in any number of processes,
add up exactly, because PostgreSQL serialises the increments on the day's row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Generic

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError

from tenantvault.db.models import EmailProviderUsage
from tenantvault.errors import InvalidInputError, NotFoundError
from tenantvault.vault.core import CallerSession, VaultCore
from tenantvault.vault.methods import FacadeMethods, Runs


@dataclass(frozen=True)
class UsageDay:
    day: date
    sent: int
    failed: int
    last_used_at: datetime


@dataclass(frozen=True)
class Usage:
    """A config's usage since a day: per-day rows and their totals."""

    config_id: str
    days: list[UsageDay] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(d.sent for d in self.days)

    @property
    def failed(self) -> int:
        return sum(d.failed for d in self.days)

    @property
    def last_used_at(self) -> datetime | None:
        return max((d.last_used_at for d in self.days), default=None)


def _count(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10**9:
        raise InvalidInputError(f"{name}: must be an integer from 0 to 1,000,000,000")
    return value


class UsageService(Generic[CallerSession]):
    """Per-day sending counters of a tenant's configs."""

    def __init__(self, core: VaultCore[CallerSession]) -> None:
        self._core = core

    def record_usage(
        self,
        tenant_id: str,
        config_id: str,
        *,
        sent: int = 0,
        failed: int = 0,
        now: datetime | None = None,
        session: CallerSession | None = None,
    ) -> None:
        """Add ``sent`` and ``failed`` to the config's counters of the day (UTC).

        Raises:
            InvalidInputError: a count is negative, not an integer, or both are zero.
            NotFoundError: no such config for the tenant.
        """
        sent, failed = _count("sent", sent), _count("failed", failed)
        if sent == 0 and failed == 0:
            raise InvalidInputError("sent: sent and failed cannot both be 0")
        moment = (now or datetime.now(UTC)).astimezone(UTC)
        table = EmailProviderUsage.__table__
        statement = pg_insert(EmailProviderUsage).values(
            tenant_id=tenant_id,
            config_id=config_id,
            day=moment.date(),
            sent=sent,
            failed=failed,
            last_used_at=moment,
        )
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.tenant_id, table.c.config_id, table.c.day],
            set_={
                "sent": table.c.sent + statement.excluded.sent,
                "failed": table.c.failed + statement.excluded.failed,
                "last_used_at": sa.func.greatest(
                    table.c.last_used_at, statement.excluded.last_used_at
                ),
            },
        )
        try:
            with self._core.scope(tenant_id, session) as s:
                if session is None:
                    s.execute(statement)
                else:  # a savepoint, so a refusal does not abort the caller's transaction
                    with s.begin_nested():
                        s.execute(statement)
        except IntegrityError as exc:
            if "fk_email_provider_usage_config" in str(exc.orig):
                raise NotFoundError(f"no config {config_id} for tenant {tenant_id}") from None
            raise

    def usage(
        self,
        tenant_id: str,
        config_id: str,
        *,
        since: date,
        session: CallerSession | None = None,
    ) -> Usage:
        """The config's counters from ``since`` (a UTC day) on, oldest first."""
        with self._core.scope(tenant_id, session) as s:
            rows = s.scalars(
                sa.select(EmailProviderUsage)
                .where(
                    EmailProviderUsage.tenant_id == tenant_id,
                    EmailProviderUsage.config_id == config_id,
                    EmailProviderUsage.day >= since,
                )
                .order_by(EmailProviderUsage.day)
            ).all()
            return Usage(
                config_id,
                [UsageDay(r.day, r.sent, r.failed, r.last_used_at) for r in rows],
            )


class UsageMethods(FacadeMethods[CallerSession]):
    """UsageService's methods on both facades (:mod:`tenantvault.vault.methods`)."""

    record_usage = Runs(UsageService[CallerSession].record_usage)
    usage = Runs(UsageService[CallerSession].usage)
