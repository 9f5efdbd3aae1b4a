"""Config history: every kept version, one version with its credentials, rollback."""

from __future__ import annotations

import logging
from typing import Generic

from sqlalchemy.orm import Session

from tenantvault.db import queries
from tenantvault.db.models import (
    AuditAction,
    ConfigChange,
    EmailProviderConfigVersion,
    ProviderType,
)
from tenantvault.errors import InvalidInputError, NotFoundError
from tenantvault.keys.sealed import VERSION_CREDENTIALS, config_digest
from tenantvault.vault.core import CallerSession, VaultCore
from tenantvault.vault.methods import FacadeMethods, Runs
from tenantvault.vault.providers import credentials_from_storage
from tenantvault.vault.tokens import reseal_tokens_for_config
from tenantvault.vault.versions import (
    changes,
    check_expected_version,
    checked_note,
    write_version,
)
from tenantvault.vault.views import ConfigVersion, ProviderConfig, version_view

log = logging.getLogger("tenantvault")


class HistoryService(Generic[CallerSession]):
    """The kept versions of a tenant's configs."""

    def __init__(self, core: VaultCore[CallerSession]) -> None:
        self._core = core

    def _version_view(
        self,
        session: Session,
        row: EmailProviderConfigVersion,
        kind: ProviderType,
        with_credentials: bool,
    ) -> ConfigVersion:
        credentials = None
        if with_credentials and row.encrypted_credentials is not None:
            context = VERSION_CREDENTIALS.place(
                row.tenant_id,
                row.config_id,
                row.version,
                bound=(kind, row.version),
                config=row.config,
            )
            sealer = self._core.sealer(session, row.tenant_id)
            credentials = credentials_from_storage(
                kind, sealer.open(row.encrypted_credentials, context)
            )
        return version_view(row, kind, credentials)

    @staticmethod
    def _kept_version(
        session: Session, tenant_id: str, config_id: str, version: int
    ) -> EmailProviderConfigVersion:
        row = session.scalars(queries.config_version(tenant_id, config_id, version)).one_or_none()
        if row is None:
            raise NotFoundError(
                f"config {config_id} of tenant {tenant_id} has no version {version}"
            )
        return row

    def list_config_versions(
        self, tenant_id: str, config_id: str, *, session: CallerSession | None = None
    ) -> list[ConfigVersion]:
        """Every kept version of a live config, oldest first (no secrets opened)."""
        with self._core.scope(tenant_id, session) as s:
            config = self._core.live(s, tenant_id, config_id, lock=False)
            rows = s.scalars(queries.config_versions(tenant_id, config_id)).all()
            return [self._version_view(s, r, ProviderType(config.type), False) for r in rows]

    def get_config_version(
        self,
        tenant_id: str,
        config_id: str,
        version: int,
        *,
        with_credentials: bool = False,
        session: CallerSession | None = None,
    ) -> ConfigVersion:
        """One kept version of a live config, its credentials opened if asked and kept.

        Raises:
            NotFoundError: no such config or version.
        """
        with self._core.scope(tenant_id, session) as s:
            config = self._core.live(s, tenant_id, config_id, lock=False)
            row = self._kept_version(s, tenant_id, config_id, version)
            return self._version_view(s, row, ProviderType(config.type), with_credentials)

    def rollback_config(
        self,
        tenant_id: str,
        config_id: str,
        to_version: int,
        *,
        actor: str | None = None,
        reason: str | None = None,
        expected_version: int | None = None,
        session: CallerSession | None = None,
    ) -> ProviderConfig:
        """Make a kept version current again, as a new version (history only grows).

        Raises:
            NotFoundError: no such config or version.
            InvalidInputError: that version's credentials are no longer kept, or its
                name is now taken by another live config.
            ConcurrentModification: ``expected_version`` is given and the config moved on.
        """
        actor = checked_note("actor", actor)
        reason = checked_note("reason", reason) or f"rollback to version {to_version}"
        with self._core.scope(tenant_id, session) as s:
            row = self._core.live(s, tenant_id, config_id)
            check_expected_version(row, expected_version)
            old = self._version_view(
                s,
                self._kept_version(s, tenant_id, config_id, to_version),
                ProviderType(row.type),
                True,
            )
            if old.credentials is None and row.encrypted_credentials is not None:
                raise InvalidInputError(
                    f"to_version: the credentials of version {to_version} are no longer kept "
                    "(pruned by retention, or older than versioning); use update_config"
                )
            digest_before = config_digest(row.config)
            with changes(s, tenant_id, old.name, joined=session is not None):
                row.name = old.name
                row.config = old.config.model_dump(mode="json", exclude_none=True)
                if config_digest(row.config) != digest_before:
                    # As update_config: the tokens follow the config they are bound to.
                    reseal_tokens_for_config(s, self._core.sealer(s, tenant_id), row, digest_before)
                row.version += 1
                write_version(
                    s,
                    self._core.sealer(s, tenant_id),
                    row,
                    ConfigChange.ROLLBACK,
                    old.credentials,
                    credentials_kept=self._core.history_credentials_kept,
                    actor=actor,
                    reason=reason,
                )
            self._core.audit_config(
                s,
                row,
                AuditAction.CONFIG_ROLLED_BACK,
                actor,
                version=row.version,
                to_version=to_version,
            )
            log.info(
                "config rolled back tenant=%s config=%s to=%s", tenant_id, config_id, to_version
            )
            return self._core.view(s, row, with_credentials=False)


class HistoryMethods(FacadeMethods[CallerSession]):
    """HistoryService's methods on both facades (:mod:`tenantvault.vault.methods`)."""

    list_config_versions = Runs(HistoryService[CallerSession].list_config_versions)
    get_config_version = Runs(HistoryService[CallerSession].get_config_version)
    rollback_config = Runs(HistoryService[CallerSession].rollback_config)
