"""Configs: create (also from a template), read, list, change, and their lifecycle
(default, deactivate, soft delete, restore)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Generic

import sqlalchemy as sa
from sqlalchemy.orm import Session

from tenantvault.db import queries
from tenantvault.db.ids import new_id
from tenantvault.db.models import AuditAction, ConfigChange, EmailProviderConfig, ProviderType
from tenantvault.errors import InvalidInputError
from tenantvault.keys.sealed import config_digest
from tenantvault.vault.core import CallerSession, VaultCore
from tenantvault.vault.methods import FacadeMethods, Runs
from tenantvault.vault.providers import (
    check_credentials_present,
    parse_config,
    parse_credentials,
    provider_type,
)
from tenantvault.vault.templates import merged_config, template
from tenantvault.vault.tokens import reseal_tokens_for_config
from tenantvault.vault.versions import (
    changes,
    check_expected_version,
    checked_name,
    checked_note,
    write_version,
)
from tenantvault.vault.views import ProviderConfig

log = logging.getLogger("tenantvault")


class ConfigService(Generic[CallerSession]):
    """A tenant's provider configs."""

    def __init__(self, core: VaultCore[CallerSession]) -> None:
        self._core = core

    def create_config(
        self,
        tenant_id: str,
        *,
        type: str | ProviderType,
        name: str,
        config: Any,
        credentials: Any = None,
        is_default: bool = False,
        is_active: bool = True,
        actor: str | None = None,
        reason: str | None = None,
        session: CallerSession | None = None,
    ) -> ProviderConfig:
        """Create a config at version 1; everything is validated before anything is written.

        Raises:
            InvalidInputError: a bad field (named), the name is taken by a live config,
                or the tenant has no row in the ``tenants`` table.
        """
        kind = provider_type(type)
        name = checked_name(name)
        actor, reason = checked_note("actor", actor), checked_note("reason", reason)
        parsed = parse_config(kind, config)
        secret = None if credentials is None else parse_credentials(kind, credentials, parsed)
        check_credentials_present(parsed, secret is not None)
        if is_default and not is_active:
            raise InvalidInputError("is_default: an inactive config cannot be the default")
        config_id = new_id()
        with self._core.scope(tenant_id, session) as s:
            if is_default:
                _clear_default(s, tenant_id)
            row = EmailProviderConfig(
                id=config_id,
                tenant_id=tenant_id,
                type=kind,
                name=name,
                config=parsed.model_dump(mode="json", exclude_none=True),
                is_default=is_default,
                is_active=is_active,
                version=1,
            )
            with changes(s, tenant_id, name, joined=session is not None):
                s.add(row)
                write_version(
                    s,
                    self._core.sealer(s, tenant_id),
                    row,
                    ConfigChange.CREATED,
                    secret,
                    credentials_kept=self._core.history_credentials_kept,
                    actor=actor,
                    reason=reason,
                )
            self._core.audit_config(
                s,
                row,
                AuditAction.CONFIG_CREATED,
                actor,
                type=kind.value,
                version=1,
                with_credentials=secret is not None,
                is_default=is_default,
            )
            log.info("config created tenant=%s config=%s type=%s", tenant_id, config_id, kind.value)
            return self._core.view(s, row, with_credentials=False)

    def create_config_from_template(
        self,
        tenant_id: str,
        template_key: str,
        *,
        name: str,
        config: Any = None,
        credentials: Any = None,
        is_default: bool = False,
        actor: str | None = None,
        reason: str | None = None,
        session: CallerSession | None = None,
    ) -> ProviderConfig:
        """Create a config from a built-in template (``tenantvault.templates.TEMPLATES``):
        ``config`` is merged over the template's settings, and the result validated
        like any config.

        Raises:
            InvalidInputError: unknown template, or a field of the merged config (named).
        """
        chosen = template(template_key)
        if config is not None and not isinstance(config, dict):
            raise InvalidInputError("config: must be an object")
        return self.create_config(
            tenant_id,
            type=chosen.type,
            name=name,
            config=merged_config(chosen.config, config),
            credentials=credentials,
            is_default=is_default,
            actor=actor,
            reason=reason or f"from template {chosen.key}",
            session=session,
        )

    # --- reading: one lookup, four ways to name the config ---

    def _get(
        self,
        tenant_id: str,
        statement: sa.Select[EmailProviderConfig],
        missing: str,
        with_credentials: bool,
        session: CallerSession | None,
    ) -> ProviderConfig:
        with self._core.scope(tenant_id, session) as s:
            return self._core.view(s, self._core.one(s, statement, missing), with_credentials)

    def get_config(
        self,
        tenant_id: str,
        config_id: str,
        *,
        with_credentials: bool = False,
        session: CallerSession | None = None,
    ) -> ProviderConfig:
        """A live config by id. Raises NotFoundError."""
        return self._get(
            tenant_id,
            queries.config_by_id(tenant_id, config_id),
            f"no live config {config_id} for tenant {tenant_id}",
            with_credentials,
            session,
        )

    def get_default_config(
        self,
        tenant_id: str,
        *,
        with_credentials: bool = False,
        session: CallerSession | None = None,
    ) -> ProviderConfig:
        """The tenant's default config. Raises NotFoundError."""
        return self._get(
            tenant_id,
            queries.default_config(tenant_id),
            f"tenant {tenant_id} has no default config",
            with_credentials,
            session,
        )

    def get_config_by_name(
        self,
        tenant_id: str,
        name: str,
        *,
        with_credentials: bool = False,
        session: CallerSession | None = None,
    ) -> ProviderConfig:
        """A live config by name. Raises NotFoundError."""
        return self._get(
            tenant_id,
            queries.config_by_name(tenant_id, name),
            f"tenant {tenant_id} has no live config of that name",
            with_credentials,
            session,
        )

    def get_config_for_sender(
        self,
        tenant_id: str,
        sender_id: str,
        *,
        with_credentials: bool = False,
        session: CallerSession | None = None,
    ) -> ProviderConfig:
        """The config a sender identity sends through. Raises NotFoundError."""
        return self._get(
            tenant_id,
            queries.config_for_sender(tenant_id, sender_id),
            f"sender {sender_id} of tenant {tenant_id} has no live config",
            with_credentials,
            session,
        )

    def list_active_configs(
        self, tenant_id: str, *, session: CallerSession | None = None
    ) -> list[ProviderConfig]:
        with self._core.scope(tenant_id, session) as s:
            rows = s.scalars(queries.active_configs(tenant_id)).all()
            return [self._core.view(s, row, False) for row in rows]

    def list_configs_of_type(
        self,
        tenant_id: str,
        type: str | ProviderType,
        *,
        session: CallerSession | None = None,
    ) -> list[ProviderConfig]:
        kind = provider_type(type)
        with self._core.scope(tenant_id, session) as s:
            rows = s.scalars(queries.configs_of_type(tenant_id, kind)).all()
            return [self._core.view(s, row, False) for row in rows]

    # --- changing ---

    def update_config(
        self,
        tenant_id: str,
        config_id: str,
        *,
        name: str | None = None,
        config: Any = None,
        credentials: Any = None,
        actor: str | None = None,
        reason: str | None = None,
        expected_version: int | None = None,
        session: CallerSession | None = None,
    ) -> ProviderConfig:
        """Change name, config and/or credentials together, as one new version.

        New credentials are checked against the new (or current) config first; the
        old version stays in the config's history.

        Raises:
            ConcurrentModification: ``expected_version`` is given and the config moved on.
        """
        new_name = None if name is None else checked_name(name)
        actor, reason = checked_note("actor", actor), checked_note("reason", reason)
        with self._core.scope(tenant_id, session) as s:
            row = self._core.live(s, tenant_id, config_id)
            check_expected_version(row, expected_version)
            if new_name is None and config is None and credentials is None:
                return self._core.view(s, row, with_credentials=False)
            parsed = parse_config(row.type, row.config if config is None else config)
            secret = (
                None if credentials is None else parse_credentials(row.type, credentials, parsed)
            )
            kept = secret
            if row.encrypted_credentials is not None and secret is None:
                # Opening checks the binding (a config rewritten by SQL is refused here).
                # The history row keeps this version's credentials too; and a new config
                # must still fit them (e.g. SMTP login to oauth2 while a password is
                # stored): checked before writing.
                kept = self._core.open_credentials(s, row)
                if config is not None:
                    parse_credentials(row.type, kept, parsed)
            if config is not None:  # a config that needs credentials has them
                check_credentials_present(parsed, kept is not None)
            if row.encrypted_credentials is not None and secret is not None:
                # New credentials replace them, but are never sealed beside a config
                # rewritten by SQL: the stored ones must still open with the row first.
                self._core.check_binding(s, row)
            only_credentials = new_name is None and config is None
            change = ConfigChange.CREDENTIALS if only_credentials else ConfigChange.UPDATED
            digest_before = config_digest(row.config)
            with changes(s, tenant_id, new_name or row.name, joined=session is not None):
                if config is not None:
                    row.config = parsed.model_dump(mode="json", exclude_none=True)
                if config_digest(row.config) != digest_before:
                    # The tokens are bound to the config's content: they follow it here,
                    # in this transaction (a token that does not open beside the config
                    # as it was stops the change).
                    reseal_tokens_for_config(s, self._core.sealer(s, tenant_id), row, digest_before)
                if new_name is not None:
                    row.name = new_name
                row.version += 1
                write_version(
                    s,
                    self._core.sealer(s, tenant_id),
                    row,
                    change,
                    kept,
                    credentials_kept=self._core.history_credentials_kept,
                    actor=actor,
                    reason=reason,
                )
            changed = [
                name
                for name, given in (("name", new_name), ("config", config), ("credentials", secret))
                if given is not None
            ]
            action = (
                AuditAction.CREDENTIALS_STORED if only_credentials else AuditAction.CONFIG_UPDATED
            )
            self._core.audit_config(s, row, action, actor, version=row.version, changed=changed)
            log.info("config updated tenant=%s config=%s", tenant_id, config_id)
            return self._core.view(s, row, with_credentials=False)

    def set_default(
        self,
        tenant_id: str,
        config_id: str,
        *,
        actor: str | None = None,
        session: CallerSession | None = None,
    ) -> None:
        """Make ``config_id`` the tenant's only default, atomically (one transaction)."""
        actor = checked_note("actor", actor)
        with self._core.scope(tenant_id, session) as s:
            row = self._core.live(s, tenant_id, config_id)
            if not row.is_active:
                raise InvalidInputError("config_id: an inactive config cannot be the default")
            _clear_default(s, tenant_id)
            s.flush()
            row.is_default = True
            s.flush()
            self._core.audit_config(s, row, AuditAction.DEFAULT_SET, actor)

    def deactivate_config(
        self,
        tenant_id: str,
        config_id: str,
        *,
        actor: str | None = None,
        session: CallerSession | None = None,
    ) -> None:
        """Keep the config but stop using it; it stops being the default."""
        actor = checked_note("actor", actor)
        with self._core.scope(tenant_id, session) as s:
            row = self._core.live(s, tenant_id, config_id)
            row.is_active = False
            row.is_default = False
            s.flush()
            self._core.audit_config(s, row, AuditAction.CONFIG_DEACTIVATED, actor)

    def delete_config(
        self,
        tenant_id: str,
        config_id: str,
        *,
        actor: str | None = None,
        session: CallerSession | None = None,
    ) -> None:
        """Soft delete: invisible to reads, its name and default slot freed. Its secrets
        stay (sealed) until ``restore_config`` or the operator's purge."""
        actor = checked_note("actor", actor)
        with self._core.scope(tenant_id, session) as s:
            row = self._core.live(s, tenant_id, config_id)
            row.is_default = False
            row.deleted_at = datetime.now(UTC)
            s.flush()
            self._core.audit_config(s, row, AuditAction.CONFIG_DELETED, actor)
            log.info("config deleted tenant=%s config=%s", tenant_id, config_id)

    def restore_config(
        self,
        tenant_id: str,
        config_id: str,
        *,
        name: str | None = None,
        actor: str | None = None,
        session: CallerSession | None = None,
    ) -> ProviderConfig:
        """Bring a soft-deleted config back (not as the default), under its name or ``name``.

        Raises:
            NotFoundError: no deleted config of that id.
            InvalidInputError: a live config has taken the name meanwhile (pass ``name``).
        """
        new_name = None if name is None else checked_name(name)
        actor = checked_note("actor", actor)
        with self._core.scope(tenant_id, session) as s:
            row = self._core.one(
                s,
                queries.deleted_config(tenant_id, config_id).with_for_update(),
                f"no deleted config {config_id} for tenant {tenant_id}",
            )
            with changes(
                s, tenant_id, new_name or row.name, joined=session is not None, restoring=True
            ):
                row.deleted_at = None
                if new_name is not None:
                    row.name = new_name
            self._core.audit_config(
                s, row, AuditAction.CONFIG_RESTORED, actor, name_changed=name is not None
            )
            return self._core.view(s, row, with_credentials=False)


class ConfigMethods(FacadeMethods[CallerSession]):
    """ConfigService's methods on both facades (:mod:`tenantvault.vault.methods`)."""

    create_config = Runs(ConfigService[CallerSession].create_config)
    create_config_from_template = Runs(ConfigService[CallerSession].create_config_from_template)
    get_config = Runs(ConfigService[CallerSession].get_config)
    get_default_config = Runs(ConfigService[CallerSession].get_default_config)
    get_config_by_name = Runs(ConfigService[CallerSession].get_config_by_name)
    get_config_for_sender = Runs(ConfigService[CallerSession].get_config_for_sender)
    list_active_configs = Runs(ConfigService[CallerSession].list_active_configs)
    list_configs_of_type = Runs(ConfigService[CallerSession].list_configs_of_type)
    update_config = Runs(ConfigService[CallerSession].update_config)
    set_default = Runs(ConfigService[CallerSession].set_default)
    deactivate_config = Runs(ConfigService[CallerSession].deactivate_config)
    delete_config = Runs(ConfigService[CallerSession].delete_config)
    restore_config = Runs(ConfigService[CallerSession].restore_config)


def _clear_default(session: Session, tenant_id: str) -> None:
    session.execute(
        sa.update(EmailProviderConfig)
        .where(EmailProviderConfig.tenant_id == tenant_id, EmailProviderConfig.is_default)
        .values(is_default=False)
    )
