"""The ``Vault`` facade: what application code calls. It never hands out a key.

Every call runs in one transaction scoped to the tenant by row-level security.
Pass ``session=`` to join the caller's SQLAlchemy session and transaction (the
tenant setting is then made on it, for the rest of that transaction); otherwise
each call opens and commits its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tenantvault import audit
from tenantvault.crypto.datakey import DataKey
from tenantvault.crypto.envelope import SealContext, open_sealed, seal, sealed_dek_version
from tenantvault.db import queries
from tenantvault.db.ids import new_id
from tenantvault.db.models import (
    AuditAction,
    ConfigChange,
    EmailProviderConfig,
    EmailProviderConfigVersion,
    ProviderType,
)
from tenantvault.db.session import check_tenant_id, create_engine, set_tenant, tenant_session
from tenantvault.errors import (
    ConcurrentModification,
    DecryptionError,
    InvalidInputError,
    NotFoundError,
)
from tenantvault.keys.cache import DataKeyCache
from tenantvault.keys.keyring import Keyring
from tenantvault.keys.sealed import CONFIG_CREDENTIALS, VERSION_CREDENTIALS
from tenantvault.kms.factory import key_provider_from_settings
from tenantvault.kms.provider import KeyProvider
from tenantvault.settings import Settings, load_settings
from tenantvault.vault.providers import (
    CredentialsModel,
    ProviderConfigModel,
    credentials_from_storage,
    credentials_to_json,
    parse_config,
    parse_credentials,
    provider_type,
)
from tenantvault.vault.templates import merged_config, template
from tenantvault.vault.tokens import ExpiringToken, OAuthToken, OAuthTokens, RefreshedToken
from tenantvault.vault.usage import Usage, UsageDay, UsageStatistics

log = logging.getLogger("tenantvault")


@dataclass(frozen=True)
class ProviderConfig:
    """A config as the application sees it; ``credentials`` only when asked for."""

    id: str
    tenant_id: str
    type: ProviderType
    name: str
    config: ProviderConfigModel
    is_default: bool
    is_active: bool
    created_at: datetime
    updated_at: datetime
    has_credentials: bool
    version: int
    credentials: CredentialsModel | None = None


@dataclass(frozen=True)
class ConfigVersion:
    """One kept version of a config; ``credentials`` only when asked for."""

    config_id: str
    version: int
    change: ConfigChange
    name: str
    config: ProviderConfigModel
    has_credentials: bool
    actor: str | None
    reason: str | None
    created_at: datetime
    credentials: CredentialsModel | None = None


def _name(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidInputError("name: must be 1-200 characters, not blank")
    return name.strip()


def _note(field: str, value: str | None) -> str | None:
    """An actor or reason: free text kept in history, so bounded and printable."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 500:
        raise InvalidInputError(f"{field}: must be 1-500 characters, not blank")
    if not value.isprintable():
        raise InvalidInputError(f"{field}: must be printable text")
    return value.strip()


def _check_version(row: EmailProviderConfig, expected_version: int | None) -> None:
    if expected_version is not None and row.version != expected_version:
        raise ConcurrentModification(
            f"config {row.id} of tenant {row.tenant_id} is at version {row.version}, "
            f"not {expected_version}: read it again and retry"
        )


def _plaintext(credentials: CredentialsModel) -> bytes:
    return json.dumps(credentials_to_json(credentials), separators=(",", ":")).encode()


class Vault(OAuthTokens, UsageStatistics):
    """Store and load tenants' email-provider configs, credentials and OAuth tokens."""

    def __init__(
        self,
        engine: sa.Engine,
        keyring: Keyring,
        *,
        history_credentials_kept: int = 10,
        audit_loads: bool = False,
    ) -> None:
        if history_credentials_kept < 1:
            raise ValueError("history_credentials_kept must be at least 1")
        self.engine = engine
        self.keyring = keyring
        self.history_credentials_kept = history_credentials_kept
        self.audit_loads = audit_loads
        schema = (engine.get_execution_options().get("schema_translate_map") or {}).get(None)
        if not schema:
            raise ValueError("the engine must come from tenantvault.db.create_engine")
        self._load_sql = (
            "SELECT type, encrypted_credentials "
            f'FROM "{schema}".tenantvault_config_credentials(%s, %s)'
        )

    def __repr__(self) -> str:
        return f"Vault(engine={self.engine!r}, keyring={self.keyring!r})"

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, *, key_provider: KeyProvider | None = None
    ) -> Vault:
        """A vault from ``TENANTVAULT_*`` / ``VAULT_*`` settings."""
        settings = settings or load_settings()
        provider = key_provider or key_provider_from_settings(settings)
        cache = DataKeyCache(
            max_age_seconds=settings.dek_cache_max_age_seconds,
            max_entries=settings.dek_cache_max_entries,
            max_uses=settings.dek_cache_max_uses,
        )
        return cls(
            create_engine(settings),
            Keyring(provider, cache),
            history_credentials_kept=settings.config_history_credentials_kept,
            audit_loads=settings.audit_loads,
        )

    # --- plumbing ---

    @contextmanager
    def _scope(self, tenant_id: str, session: Session | None) -> Iterator[Session]:
        # Both branches check tenant_id before touching the database.
        if session is None:
            with tenant_session(self.engine, tenant_id) as own:
                yield own
            return
        set_tenant(session.connection(), tenant_id)
        yield session

    def _write(
        self,
        session: Session,
        row: EmailProviderConfig,
        change: ConfigChange,
        secret: CredentialsModel | None,
        *,
        actor: str | None,
        reason: str | None,
        new_secret: bool,
    ) -> None:
        """Seal ``secret`` into the row (when ``new_secret``) and keep the row's new
        version, with ``secret`` sealed again for the history row; prune the secrets
        of versions past the retention bound."""
        key: DataKey | None = None
        plaintext = b""
        if secret is not None:
            key = self.keyring.active_key(session.connection(), row.tenant_id)
            plaintext = _plaintext(secret)
            if new_secret:
                row.encrypted_credentials = seal(
                    key, plaintext, CONFIG_CREDENTIALS.place(row.tenant_id, row.id)
                )
        session.add(
            EmailProviderConfigVersion(
                tenant_id=row.tenant_id,
                config_id=row.id,
                version=row.version,
                change=change,
                name=row.name,
                config=row.config,
                encrypted_credentials=None
                if key is None
                else seal(
                    key, plaintext, VERSION_CREDENTIALS.place(row.tenant_id, row.id, row.version)
                ),
                actor=actor,
                reason=reason,
            )
        )
        oldest_kept = row.version - self.history_credentials_kept + 1
        if oldest_kept > 1:
            # Not flushed here: the caller flushes the row inside its IntegrityError guard.
            with session.no_autoflush:
                session.execute(
                    sa.update(EmailProviderConfigVersion)
                    .where(
                        EmailProviderConfigVersion.tenant_id == row.tenant_id,
                        EmailProviderConfigVersion.config_id == row.id,
                        EmailProviderConfigVersion.version < oldest_kept,
                        EmailProviderConfigVersion.encrypted_credentials.is_not(None),
                    )
                    .values(encrypted_credentials=None)
                )

    def _open(self, session: Session, sealed: str, context: SealContext) -> bytes:
        key = self.keyring.key(session.connection(), context.tenant_id, sealed_dek_version(sealed))
        return open_sealed(key, sealed, context)

    def _open_credentials(self, session: Session, row: EmailProviderConfig) -> CredentialsModel:
        if row.encrypted_credentials is None:
            raise NotFoundError(f"config {row.id} of tenant {row.tenant_id} has no credentials")
        context = CONFIG_CREDENTIALS.place(row.tenant_id, row.id)
        # Checked against the config whenever either was written (create, update),
        # so loads, cached or not, rebuild only the credentials model.
        return credentials_from_storage(
            ProviderType(row.type), self._open(session, row.encrypted_credentials, context)
        )

    def _view(
        self, session: Session, row: EmailProviderConfig, with_credentials: bool
    ) -> ProviderConfig:
        credentials = None
        if with_credentials and row.encrypted_credentials is not None:
            credentials = self._open_credentials(session, row)
        return ProviderConfig(
            id=row.id,
            tenant_id=row.tenant_id,
            type=ProviderType(row.type),
            name=row.name,
            config=parse_config(row.type, row.config),
            is_default=row.is_default,
            is_active=row.is_active,
            created_at=row.created_at,
            updated_at=row.updated_at,
            has_credentials=row.encrypted_credentials is not None,
            version=row.version,
            credentials=credentials,
        )

    def _one(self, session: Session, statement: Any, what: str) -> EmailProviderConfig:
        row = session.scalars(statement).one_or_none()
        if row is None:
            raise NotFoundError(what)
        assert isinstance(row, EmailProviderConfig)
        return row

    def _live(self, session: Session, tenant_id: str, config_id: str) -> EmailProviderConfig:
        return self._one(
            session,
            queries.config_by_id(tenant_id, config_id).with_for_update(),
            f"no live config {config_id} for tenant {tenant_id}",
        )

    @staticmethod
    def _audit(
        session: Session,
        row: EmailProviderConfig,
        action: AuditAction,
        actor: str | None,
        **details: str | int | bool | list[str] | None,
    ) -> None:
        audit.record(
            session.connection(),
            row.tenant_id,
            action,
            actor=actor,
            target_type="config",
            target_id=row.id,
            details=details,
        )

    @staticmethod
    def _clear_default(session: Session, tenant_id: str) -> None:
        session.execute(
            sa.update(EmailProviderConfig)
            .where(EmailProviderConfig.tenant_id == tenant_id, EmailProviderConfig.is_default)
            .values(is_default=False)
        )

    # --- configs ---

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
        session: Session | None = None,
    ) -> ProviderConfig:
        """Create a config at version 1; everything is validated before anything is written.

        Raises:
            InvalidInputError: a bad field (named), or the name is taken by a live config.
            NotFoundError: the tenant does not exist.
        """
        kind = provider_type(type)
        name = _name(name)
        actor, reason = _note("actor", actor), _note("reason", reason)
        parsed = parse_config(kind, config)
        secret = None if credentials is None else parse_credentials(kind, credentials, parsed)
        if is_default and not is_active:
            raise InvalidInputError("is_default: an inactive config cannot be the default")
        config_id = new_id()
        with self._scope(tenant_id, session) as s:
            if is_default:
                self._clear_default(s, tenant_id)
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
            with _changes(s, tenant_id, name, joined=session is not None):
                s.add(row)
                self._write(
                    s,
                    row,
                    ConfigChange.CREATED,
                    secret,
                    actor=actor,
                    reason=reason,
                    new_secret=True,
                )
            self._audit(
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
            return self._view(s, row, with_credentials=False)

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
        session: Session | None = None,
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

    def get_config(
        self,
        tenant_id: str,
        config_id: str,
        *,
        with_credentials: bool = False,
        session: Session | None = None,
    ) -> ProviderConfig:
        """A live config by id. Raises NotFoundError."""
        with self._scope(tenant_id, session) as s:
            row = self._one(
                s,
                queries.config_by_id(tenant_id, config_id),
                f"no live config {config_id} for tenant {tenant_id}",
            )
            return self._view(s, row, with_credentials)

    def get_default_config(
        self, tenant_id: str, *, with_credentials: bool = False, session: Session | None = None
    ) -> ProviderConfig:
        """The tenant's default config. Raises NotFoundError."""
        with self._scope(tenant_id, session) as s:
            row = self._one(
                s, queries.default_config(tenant_id), f"tenant {tenant_id} has no default config"
            )
            return self._view(s, row, with_credentials)

    def get_config_by_name(
        self,
        tenant_id: str,
        name: str,
        *,
        with_credentials: bool = False,
        session: Session | None = None,
    ) -> ProviderConfig:
        """A live config by name. Raises NotFoundError."""
        with self._scope(tenant_id, session) as s:
            row = self._one(
                s,
                queries.config_by_name(tenant_id, name),
                f"tenant {tenant_id} has no live config of that name",
            )
            return self._view(s, row, with_credentials)

    def get_config_for_sender(
        self,
        tenant_id: str,
        sender_id: str,
        *,
        with_credentials: bool = False,
        session: Session | None = None,
    ) -> ProviderConfig:
        """The config a sender identity sends through. Raises NotFoundError."""
        with self._scope(tenant_id, session) as s:
            row = self._one(
                s,
                queries.config_for_sender(tenant_id, sender_id),
                f"sender {sender_id} of tenant {tenant_id} has no live config",
            )
            return self._view(s, row, with_credentials)

    def list_active_configs(
        self, tenant_id: str, *, session: Session | None = None
    ) -> list[ProviderConfig]:
        with self._scope(tenant_id, session) as s:
            rows = s.scalars(queries.active_configs(tenant_id)).all()
            return [self._view(s, row, False) for row in rows]

    def list_configs_of_type(
        self,
        tenant_id: str,
        type: str | ProviderType,
        *,
        session: Session | None = None,
    ) -> list[ProviderConfig]:
        kind = provider_type(type)
        with self._scope(tenant_id, session) as s:
            rows = s.scalars(queries.configs_of_type(tenant_id, kind)).all()
            return [self._view(s, row, False) for row in rows]

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
        session: Session | None = None,
    ) -> ProviderConfig:
        """Change name, config and/or credentials together, as one new version.

        New credentials are checked against the new (or current) config first; the
        old version stays in the config's history.

        Raises:
            ConcurrentModification: ``expected_version`` is given and the config moved on.
        """
        new_name = None if name is None else _name(name)
        actor, reason = _note("actor", actor), _note("reason", reason)
        with self._scope(tenant_id, session) as s:
            row = self._live(s, tenant_id, config_id)
            _check_version(row, expected_version)
            if new_name is None and config is None and credentials is None:
                return self._view(s, row, with_credentials=False)
            parsed = parse_config(row.type, row.config if config is None else config)
            secret = (
                None if credentials is None else parse_credentials(row.type, credentials, parsed)
            )
            kept = secret
            if secret is None and row.encrypted_credentials is not None:
                # The history row keeps the credentials of this version too; and a new
                # config must still fit them (e.g. SMTP login to oauth2 while a password
                # is stored): checked before writing.
                kept = self._open_credentials(s, row)
                if config is not None:
                    parse_credentials(row.type, kept, parsed)
            only_credentials = new_name is None and config is None
            change = ConfigChange.CREDENTIALS if only_credentials else ConfigChange.UPDATED
            with _changes(s, tenant_id, new_name or row.name, joined=session is not None):
                if config is not None:
                    row.config = parsed.model_dump(mode="json", exclude_none=True)
                if new_name is not None:
                    row.name = new_name
                row.version += 1
                self._write(
                    s, row, change, kept, actor=actor, reason=reason, new_secret=secret is not None
                )
            changed = [
                name
                for name, given in (("name", new_name), ("config", config), ("credentials", secret))
                if given is not None
            ]
            action = (
                AuditAction.CREDENTIALS_STORED if only_credentials else AuditAction.CONFIG_UPDATED
            )
            self._audit(s, row, action, actor, version=row.version, changed=changed)
            log.info("config updated tenant=%s config=%s", tenant_id, config_id)
            return self._view(s, row, with_credentials=False)

    def set_default(
        self,
        tenant_id: str,
        config_id: str,
        *,
        actor: str | None = None,
        session: Session | None = None,
    ) -> None:
        """Make ``config_id`` the tenant's only default, atomically (one transaction)."""
        actor = _note("actor", actor)
        with self._scope(tenant_id, session) as s:
            row = self._live(s, tenant_id, config_id)
            if not row.is_active:
                raise InvalidInputError("config_id: an inactive config cannot be the default")
            self._clear_default(s, tenant_id)
            s.flush()
            row.is_default = True
            s.flush()
            self._audit(s, row, AuditAction.DEFAULT_SET, actor)

    def deactivate_config(
        self,
        tenant_id: str,
        config_id: str,
        *,
        actor: str | None = None,
        session: Session | None = None,
    ) -> None:
        """Keep the config but stop using it; it stops being the default."""
        actor = _note("actor", actor)
        with self._scope(tenant_id, session) as s:
            row = self._live(s, tenant_id, config_id)
            row.is_active = False
            row.is_default = False
            s.flush()
            self._audit(s, row, AuditAction.CONFIG_DEACTIVATED, actor)

    def delete_config(
        self,
        tenant_id: str,
        config_id: str,
        *,
        actor: str | None = None,
        session: Session | None = None,
    ) -> None:
        """Soft delete: invisible to reads, its name and default slot freed. Its secrets
        stay (sealed) until ``restore_config`` or the operator's purge."""
        actor = _note("actor", actor)
        with self._scope(tenant_id, session) as s:
            row = self._live(s, tenant_id, config_id)
            row.is_default = False
            row.deleted_at = datetime.now(UTC)
            s.flush()
            self._audit(s, row, AuditAction.CONFIG_DELETED, actor)
            log.info("config deleted tenant=%s config=%s", tenant_id, config_id)

    def restore_config(
        self,
        tenant_id: str,
        config_id: str,
        *,
        name: str | None = None,
        actor: str | None = None,
        session: Session | None = None,
    ) -> ProviderConfig:
        """Bring a soft-deleted config back (not as the default), under its name or ``name``.

        Raises:
            NotFoundError: no deleted config of that id.
            InvalidInputError: a live config has taken the name meanwhile (pass ``name``).
        """
        new_name = None if name is None else _name(name)
        actor = _note("actor", actor)
        with self._scope(tenant_id, session) as s:
            row = self._one(
                s,
                queries.deleted_config(tenant_id, config_id).with_for_update(),
                f"no deleted config {config_id} for tenant {tenant_id}",
            )
            with _changes(
                s, tenant_id, new_name or row.name, joined=session is not None, restoring=True
            ):
                row.deleted_at = None
                if new_name is not None:
                    row.name = new_name
            self._audit(s, row, AuditAction.CONFIG_RESTORED, actor, name_changed=name is not None)
            return self._view(s, row, with_credentials=False)

    # --- credentials ---

    def store_credentials(
        self,
        tenant_id: str,
        config_id: str,
        credentials: Any,
        *,
        actor: str | None = None,
        reason: str | None = None,
        expected_version: int | None = None,
        session: Session | None = None,
    ) -> int:
        """Validate and seal new credentials for a live config: credential rotation.

        The config gets a new version; the old credentials stay in its history
        (within the retention bound). Returns the new version.

        Raises:
            ConcurrentModification: ``expected_version`` is given and the config moved on.
        """
        return self.update_config(
            tenant_id,
            config_id,
            credentials=credentials,
            actor=actor,
            reason=reason,
            expected_version=expected_version,
            session=session,
        ).version

    # --- config history ---

    def _version_view(
        self, session: Session, row: EmailProviderConfigVersion, kind: ProviderType, opened: bool
    ) -> ConfigVersion:
        credentials = None
        if opened and row.encrypted_credentials is not None:
            context = VERSION_CREDENTIALS.place(row.tenant_id, row.config_id, row.version)
            plaintext = self._open(session, row.encrypted_credentials, context)
            credentials = credentials_from_storage(kind, plaintext)
        return ConfigVersion(
            config_id=row.config_id,
            version=row.version,
            change=ConfigChange(row.change),
            name=row.name,
            config=parse_config(kind, row.config),
            has_credentials=row.encrypted_credentials is not None,
            actor=row.actor,
            reason=row.reason,
            created_at=row.created_at,
            credentials=credentials,
        )

    def list_config_versions(
        self, tenant_id: str, config_id: str, *, session: Session | None = None
    ) -> list[ConfigVersion]:
        """Every kept version of a live config, oldest first (no secrets opened)."""
        with self._scope(tenant_id, session) as s:
            config = self._one(
                s,
                queries.config_by_id(tenant_id, config_id),
                f"no live config {config_id} for tenant {tenant_id}",
            )
            rows = s.scalars(queries.config_versions(tenant_id, config_id)).all()
            return [self._version_view(s, r, ProviderType(config.type), False) for r in rows]

    def get_config_version(
        self,
        tenant_id: str,
        config_id: str,
        version: int,
        *,
        with_credentials: bool = False,
        session: Session | None = None,
    ) -> ConfigVersion:
        """One kept version of a live config, its credentials opened if asked and kept.

        Raises:
            NotFoundError: no such config or version.
        """
        with self._scope(tenant_id, session) as s:
            config = self._one(
                s,
                queries.config_by_id(tenant_id, config_id),
                f"no live config {config_id} for tenant {tenant_id}",
            )
            row = self._kept_version(s, tenant_id, config_id, version)
            return self._version_view(s, row, ProviderType(config.type), with_credentials)

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

    def rollback_config(
        self,
        tenant_id: str,
        config_id: str,
        to_version: int,
        *,
        actor: str | None = None,
        reason: str | None = None,
        expected_version: int | None = None,
        session: Session | None = None,
    ) -> ProviderConfig:
        """Make a kept version current again, as a new version (history only grows).

        Raises:
            NotFoundError: no such config or version.
            InvalidInputError: that version's credentials are no longer kept, or its
                name is now taken by another live config.
            ConcurrentModification: ``expected_version`` is given and the config moved on.
        """
        actor = _note("actor", actor)
        reason = _note("reason", reason) or f"rollback to version {to_version}"
        with self._scope(tenant_id, session) as s:
            row = self._live(s, tenant_id, config_id)
            _check_version(row, expected_version)
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
            with _changes(s, tenant_id, old.name, joined=session is not None):
                row.name = old.name
                row.config = old.config.model_dump(mode="json", exclude_none=True)
                row.encrypted_credentials = None
                row.version += 1
                self._write(
                    s,
                    row,
                    ConfigChange.ROLLBACK,
                    old.credentials,
                    actor=actor,
                    reason=reason,
                    new_secret=True,
                )
            self._audit(
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
            return self._view(s, row, with_credentials=False)

    def load_credentials(
        self,
        tenant_id: str,
        config_id: str,
        *,
        actor: str | None = None,
        session: Session | None = None,
    ) -> CredentialsModel:
        """The opened credentials of a live config (secrets as ``SecretStr``).

        With load auditing on (``TENANTVAULT_AUDIT_LOADS``) each load also writes a
        ``credentials.revealed`` event in its transaction; off by default, since loads
        are the hot path (one round trip without it).

        Raises:
            NotFoundError: no such live config, or it holds no credentials.
            DecryptionError: the stored value does not open (tampered or moved).
            KeyProviderUnavailable: the tenant's key is not cached and Vault is down.
        """
        if session is None and not self.audit_loads:
            fast = self._load_credentials_one_round_trip(tenant_id, config_id)
            if fast is not None:
                return fast
        actor = _note("actor", actor)
        with self._scope(tenant_id, session) as s:
            row = self._one(
                s,
                queries.config_by_id(tenant_id, config_id),
                f"no live config {config_id} for tenant {tenant_id}",
            )
            opened = self._open_credentials(s, row)
            if self.audit_loads:
                self._audit(s, row, AuditAction.CREDENTIALS_REVEALED, actor)
            return opened

    def _load_credentials_one_round_trip(
        self, tenant_id: str, config_id: str
    ) -> CredentialsModel | None:
        """The hot path: one statement scopes the tenant and reads the row (migration
        0006's function); the key comes from the cache. None when it is not cached,
        and the caller takes the full path, which may ask the key provider."""
        check_tenant_id(tenant_id)
        # The driver connection straight from the engine's pool, in autocommit for
        # this one statement (its own implicit transaction), then handed back as
        # it was: the hot path skips the ORM and Core layers, not the pool.
        pooled = self.engine.raw_connection()
        try:
            driver = pooled.driver_connection
            assert isinstance(driver, psycopg.Connection)
            driver.autocommit = True
            try:
                row = driver.execute(self._load_sql, (tenant_id, config_id)).fetchone()
            finally:
                driver.autocommit = False
        finally:
            pooled.close()
        if row is None:
            raise NotFoundError(f"no live config {config_id} for tenant {tenant_id}")
        kind_name, sealed = row
        if sealed is None:
            raise NotFoundError(f"config {config_id} of tenant {tenant_id} has no credentials")
        key = self.keyring.cache.get(tenant_id, sealed_dek_version(sealed))
        if key is None:
            return None
        context = CONFIG_CREDENTIALS.place(tenant_id, config_id)
        # The config and the cross-checks against it were validated when these
        # credentials were stored; the hot path rebuilds only the credentials model.
        return credentials_from_storage(provider_type(kind_name), open_sealed(key, sealed, context))

    def load_many_credentials(
        self, tenant_id: str, config_ids: Sequence[str], *, session: Session | None = None
    ) -> dict[str, CredentialsModel]:
        """Credentials of many configs of one tenant: one query, one key fetch per key version."""
        with self._scope(tenant_id, session) as s:
            rows = s.scalars(queries.configs_by_ids(tenant_id, list(config_ids))).all()
            return {r.id: self._open_credentials(s, r) for r in rows if r.encrypted_credentials}


@contextmanager
def _changes(
    session: Session, tenant_id: str, name: str, *, joined: bool, restoring: bool = False
) -> Iterator[None]:
    """Flush the block's changes, turning a constraint they break into a clear error.

    In a caller's transaction (``joined``) the changes go in a savepoint, so that
    transaction stays usable after a refusal; opening one flushes what is pending,
    so changes belong inside the block. Our own transaction needs no savepoint: a
    refusal rolls all of it back."""
    try:
        if joined:
            with session.begin_nested():
                yield
                session.flush()
        else:
            yield
            session.flush()
    except IntegrityError as exc:
        raise _integrity(exc, tenant_id, name, restoring=restoring) from None


def _integrity(
    exc: IntegrityError, tenant_id: str, name: str, *, restoring: bool = False
) -> Exception:
    text = str(exc.orig)
    if "uq_email_provider_configs_tenant_id_name_live" in text:
        hint = "; restore it under another name with name=" if restoring else ""
        return InvalidInputError(
            f"name: tenant {tenant_id} already has a live config named {name!r}{hint}"
        )
    if "fk_email_provider_configs_tenant_id_tenants" in text:
        return NotFoundError(f"tenant {tenant_id} does not exist")
    return InvalidInputError("the row breaks a database constraint")


__all__ = [
    "ConfigVersion",
    "DecryptionError",
    "ExpiringToken",
    "OAuthToken",
    "ProviderConfig",
    "RefreshedToken",
    "Usage",
    "UsageDay",
    "Vault",
]
