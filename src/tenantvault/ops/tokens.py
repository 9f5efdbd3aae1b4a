"""``tenantvault tokens``: the keep-alive of users' OAuth grants, as an operator job.

``refresh_tokens`` refreshes every managed token (``microsoft_graph`` delegated,
``google_workspace`` oauth2) whose access token expires within a window, and every
one not refreshed for some days: providers revoke refresh tokens left idle
(Microsoft after 90 days of inactivity), so a mailbox nobody sends from would
otherwise need its user's consent again. Each refresh is ``Vault.refresh_oauth_token``
(the once-per-expiry lock, rotation, the re-consent mark and its audit event), so a
scheduled job and the application never refresh the same token twice.

``token_status`` lists the tokens that need re-consent and those expiring. Both
report tenants and configs, never a token. The candidates are read as the migrator
role (its policy admits every tenant); each refresh runs scoped to its tenant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import sqlalchemy as sa

from tenantvault.db.models import ProviderType
from tenantvault.db.operator import OperatorDatabase
from tenantvault.db.session import check_tenant_id
from tenantvault.errors import ReconsentRequired, TenantVaultError
from tenantvault.settings import Settings
from tenantvault.vault import Vault

Outcome = Literal["refreshed", "reconsent_required", "failed", "would_refresh"]
_FORCED = timedelta(days=36500)  # a validity no token has: the refresh is sent
_MANAGED = (ProviderType.MICROSOFT_GRAPH.value, ProviderType.GOOGLE_WORKSPACE.value)


@dataclass(frozen=True)
class ManagedToken:
    """A managed token as the job sees it (no secret)."""

    tenant_id: str
    config_id: str
    type: str
    expires_at: datetime | None
    last_changed: datetime
    reconsent_required_since: datetime | None


@dataclass(frozen=True)
class TokenOutcome:
    """What the job did with one token; ``reason``: why it was due, or why it failed."""

    tenant_id: str
    config_id: str
    outcome: Outcome
    reason: str


@dataclass
class TokenRefreshReport:
    """Every token the job looked at, with its outcome, by tenant and config."""

    dry_run: bool
    outcomes: list[TokenOutcome] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for item in self.outcomes if item.outcome == outcome)

    @property
    def needs_reconsent(self) -> bool:
        return self.count("reconsent_required") > 0

    @property
    def ok(self) -> bool:
        return not self.needs_reconsent and self.count("failed") == 0


@dataclass(frozen=True)
class TokenStatusReport:
    """Tokens that need re-consent, and those whose access token expires soon."""

    reconsent_required: list[ManagedToken]
    expiring: list[ManagedToken]


def _aware(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.replace(tzinfo=UTC)


def managed_tokens(db: OperatorDatabase, tenants: Sequence[str] = ()) -> list[ManagedToken]:
    """The token rows of every live managed config (of ``tenants`` when given) that hold
    a refresh token, in tenant and config order."""
    only = [check_tenant_id(t) for t in tenants]
    tenant_filter = " AND t.tenant_id = ANY(:tenants)" if only else ""
    statement = sa.text(
        "SELECT t.tenant_id, t.config_id, c.type, t.expires_at, t.updated_at, "
        "t.reconsent_required_at "
        f"FROM {db.table('email_provider_tokens')} t "
        f"JOIN {db.table('email_provider_configs')} c "
        "  ON c.tenant_id = t.tenant_id AND c.id = t.config_id "
        "WHERE c.deleted_at IS NULL AND c.type = ANY(:types) "
        f"  AND t.encrypted_refresh_token IS NOT NULL{tenant_filter} "
        "ORDER BY t.tenant_id, t.config_id"
    )
    parameters: dict[str, object] = {"types": list(_MANAGED)}
    if only:
        parameters["tenants"] = only
    with db.transaction() as connection:
        rows = connection.execute(statement, parameters).all()
    return [
        ManagedToken(
            row.tenant_id,
            row.config_id,
            row.type,
            _aware(row.expires_at),
            _aware(row.updated_at) or datetime.now(UTC),
            _aware(row.reconsent_required_at),
        )
        for row in rows
    ]


def _why_due(
    token: ManagedToken, moment: datetime, within: timedelta, idle: timedelta | None
) -> str | None:
    if token.expires_at is not None and token.expires_at - moment <= within:
        return "expiring"
    if idle is not None and moment - token.last_changed >= idle:
        return "idle"
    return None


def refresh_due(
    vault: Vault,
    tokens: Sequence[ManagedToken],
    *,
    expiring_within: timedelta,
    idle: timedelta | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
) -> Iterator[TokenOutcome]:
    """Refresh each of ``tokens`` that is due (expiring within ``expiring_within``, or
    unchanged for ``idle``), yielding each outcome as it comes (progress). A token
    marked for re-consent is reported as such, and no request is sent for it."""
    moment = now or datetime.now(UTC)
    for token in tokens:
        key = (token.tenant_id, token.config_id)
        if token.reconsent_required_since is not None:
            yield TokenOutcome(*key, "reconsent_required", "marked before")
            continue
        why = _why_due(token, moment, expiring_within, idle)
        if why is None:
            continue
        if dry_run:
            yield TokenOutcome(*key, "would_refresh", why)
            continue
        validity = expiring_within if why == "expiring" else _FORCED
        try:
            vault.refresh_oauth_token(*key, min_validity=validity, now=moment, actor="tokens-job")
        except ReconsentRequired:
            yield TokenOutcome(*key, "reconsent_required", "invalid_grant")
        except TenantVaultError as exc:
            yield TokenOutcome(*key, "failed", " ".join(str(exc).split()))
        else:
            yield TokenOutcome(*key, "refreshed", why)


def refresh_tokens(
    settings: Settings,
    *,
    expiring_within: timedelta,
    idle: timedelta | None = None,
    tenants: Sequence[str] = (),
    dry_run: bool = False,
    progress: Callable[[TokenOutcome], None] | None = None,
    now: datetime | None = None,
) -> TokenRefreshReport:
    """The keep-alive job from settings: every due token refreshed (see the module)."""
    report = TokenRefreshReport(dry_run=dry_run)
    db = OperatorDatabase.from_settings(settings, pool_size=1)
    vault = Vault.from_settings(settings)
    try:
        tokens = managed_tokens(db, tenants)
        for outcome in refresh_due(
            vault, tokens, expiring_within=expiring_within, idle=idle, dry_run=dry_run, now=now
        ):
            report.outcomes.append(outcome)
            if progress is not None:
                progress(outcome)
    finally:
        vault.dispose()
        db.dispose()
    return report


def token_status(
    settings: Settings, *, expiring_within: timedelta, now: datetime | None = None
) -> TokenStatusReport:
    """Managed tokens that need re-consent, and those expiring within ``expiring_within``."""
    moment = now or datetime.now(UTC)
    db = OperatorDatabase.from_settings(settings, pool_size=1)
    try:
        tokens = managed_tokens(db)
    finally:
        db.dispose()
    return TokenStatusReport(
        reconsent_required=[t for t in tokens if t.reconsent_required_since is not None],
        expiring=[
            t
            for t in tokens
            if t.reconsent_required_since is None
            and t.expires_at is not None
            and t.expires_at - moment <= expiring_within
        ],
    )
