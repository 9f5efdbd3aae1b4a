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
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tenantvault import queries
from tenantvault.db import check_tenant_id, create_engine, set_tenant, tenant_session
from tenantvault.envelope import SealContext, open_sealed, seal, sealed_dek_version
from tenantvault.errors import DecryptionError, InvalidInputError, NotFoundError
from tenantvault.ids import new_id
from tenantvault.keycache import DataKeyCache
from tenantvault.keyprovider import KeyProvider
from tenantvault.keyring import Keyring
from tenantvault.kms import key_provider_from_settings
from tenantvault.models import EmailProviderConfig, EmailProviderToken, ProviderType
from tenantvault.providers import (
    CredentialsModel,
    ProviderConfigModel,
    credentials_from_storage,
    credentials_to_json,
    parse_config,
    parse_credentials,
    provider_type,
)
from tenantvault.settings import Settings, load_settings

log = logging.getLogger("tenantvault")

CONFIGS = EmailProviderConfig.__tablename__
TOKENS = EmailProviderToken.__tablename__


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
    credentials: CredentialsModel | None = None


@dataclass(frozen=True)
class OAuthToken:
    """A config's OAuth tokens, opened. The tokens are ``SecretStr``."""

    config_id: str
    access_token: SecretStr | None
    refresh_token: SecretStr | None
    token_type: str
    expires_at: datetime | None
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class ExpiringToken:
    """A token the refresher should renew (no secret in it)."""

    config_id: str
    expires_at: datetime
    refreshable: bool


def _name(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidInputError("name: must be 1-200 characters, not blank")
    return name.strip()


class Vault:
    """Store and load tenants' email-provider configs, credentials and OAuth tokens."""

    def __init__(self, engine: sa.Engine, keyring: Keyring) -> None:
        self.engine = engine
        self.keyring = keyring
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
        return cls(create_engine(settings), Keyring(provider, cache))

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

    @staticmethod
    def _credentials_place(tenant_id: str, config_id: str) -> SealContext:
        return SealContext(tenant_id, CONFIGS, "encrypted_credentials", config_id)

    def _seal_credentials(
        self, session: Session, tenant_id: str, config_id: str, credentials: CredentialsModel
    ) -> str:
        key = self.keyring.active_key(session.connection(), tenant_id)
        plaintext = json.dumps(credentials_to_json(credentials), separators=(",", ":")).encode()
        return seal(key, plaintext, self._credentials_place(tenant_id, config_id))

    def _open(self, session: Session, sealed: str, context: SealContext) -> bytes:
        key = self.keyring.key(session.connection(), context.tenant_id, sealed_dek_version(sealed))
        return open_sealed(key, sealed, context)

    def _open_credentials(self, session: Session, row: EmailProviderConfig) -> CredentialsModel:
        if row.encrypted_credentials is None:
            raise NotFoundError(f"config {row.id} of tenant {row.tenant_id} has no credentials")
        context = self._credentials_place(row.tenant_id, row.id)
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
        session: Session | None = None,
    ) -> ProviderConfig:
        """Create a config; everything is validated before anything is written.

        Raises:
            InvalidInputError: a bad field (named), or the name is taken by a live config.
            NotFoundError: the tenant does not exist.
        """
        kind = provider_type(type)
        name = _name(name)
        parsed = parse_config(kind, config)
        secret = None if credentials is None else parse_credentials(kind, credentials, parsed)
        if is_default and not is_active:
            raise InvalidInputError("is_default: an inactive config cannot be the default")
        config_id = new_id()
        with self._scope(tenant_id, session) as s:
            if is_default:
                self._clear_default(s, tenant_id)
            sealed = (
                None if secret is None else self._seal_credentials(s, tenant_id, config_id, secret)
            )
            row = EmailProviderConfig(
                id=config_id,
                tenant_id=tenant_id,
                type=kind,
                name=name,
                config=parsed.model_dump(mode="json", exclude_none=True),
                encrypted_credentials=sealed,
                is_default=is_default,
                is_active=is_active,
            )
            try:
                with s.begin_nested():
                    s.add(row)
                    s.flush()
            except IntegrityError as exc:
                raise _integrity(exc, tenant_id, name) from None
            s.refresh(row)
            log.info("config created tenant=%s config=%s type=%s", tenant_id, config_id, kind.value)
            return self._view(s, row, with_credentials=False)

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
        session: Session | None = None,
    ) -> ProviderConfig:
        """Change name, config and/or credentials together, in one transaction.

        New credentials are checked against the new (or current) config first.
        """
        new_name = None if name is None else _name(name)
        with self._scope(tenant_id, session) as s:
            row = self._live(s, tenant_id, config_id)
            parsed = parse_config(row.type, row.config if config is None else config)
            secret = (
                None if credentials is None else parse_credentials(row.type, credentials, parsed)
            )
            if secret is None and config is not None and row.encrypted_credentials is not None:
                # A new config must still fit the stored credentials (e.g. SMTP login
                # to oauth2 while a password is stored): check before writing.
                parse_credentials(row.type, self._open_credentials(s, row), parsed)
            if config is not None:
                row.config = parsed.model_dump(mode="json", exclude_none=True)
            if new_name is not None:
                row.name = new_name
            if secret is not None:
                row.encrypted_credentials = self._seal_credentials(s, tenant_id, config_id, secret)
            try:
                with s.begin_nested():
                    s.flush()
            except IntegrityError as exc:
                raise _integrity(exc, tenant_id, new_name or row.name) from None
            s.refresh(row)
            log.info("config updated tenant=%s config=%s", tenant_id, config_id)
            return self._view(s, row, with_credentials=False)

    def set_default(
        self, tenant_id: str, config_id: str, *, session: Session | None = None
    ) -> None:
        """Make ``config_id`` the tenant's only default, atomically (one transaction)."""
        with self._scope(tenant_id, session) as s:
            row = self._live(s, tenant_id, config_id)
            if not row.is_active:
                raise InvalidInputError("config_id: an inactive config cannot be the default")
            self._clear_default(s, tenant_id)
            s.flush()
            row.is_default = True
            s.flush()

    def deactivate_config(
        self, tenant_id: str, config_id: str, *, session: Session | None = None
    ) -> None:
        """Keep the config but stop using it; it stops being the default."""
        with self._scope(tenant_id, session) as s:
            row = self._live(s, tenant_id, config_id)
            row.is_active = False
            row.is_default = False
            s.flush()

    def delete_config(
        self, tenant_id: str, config_id: str, *, session: Session | None = None
    ) -> None:
        """Soft delete: invisible to reads, its name and default slot freed."""
        with self._scope(tenant_id, session) as s:
            row = self._live(s, tenant_id, config_id)
            row.is_default = False
            row.deleted_at = datetime.now(UTC)
            s.flush()
            log.info("config deleted tenant=%s config=%s", tenant_id, config_id)

    # --- credentials ---

    def store_credentials(
        self, tenant_id: str, config_id: str, credentials: Any, *, session: Session | None = None
    ) -> None:
        """Validate and seal new credentials for a live config (replacing the old ones)."""
        self.update_config(tenant_id, config_id, credentials=credentials, session=session)

    def load_credentials(
        self, tenant_id: str, config_id: str, *, session: Session | None = None
    ) -> CredentialsModel:
        """The opened credentials of a live config (secrets as ``SecretStr``).

        Raises:
            NotFoundError: no such live config, or it holds no credentials.
            DecryptionError: the stored value does not open (tampered or moved).
            KeyProviderUnavailable: the tenant's key is not cached and Vault is down.
        """
        if session is None:
            fast = self._load_credentials_one_round_trip(tenant_id, config_id)
            if fast is not None:
                return fast
        with self._scope(tenant_id, session) as s:
            row = self._one(
                s,
                queries.config_by_id(tenant_id, config_id),
                f"no live config {config_id} for tenant {tenant_id}",
            )
            return self._open_credentials(s, row)

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
        context = self._credentials_place(tenant_id, config_id)
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

    # --- OAuth tokens ---

    def _token_context(self, tenant_id: str, config_id: str, column: str) -> SealContext:
        # One token row per config: the config id names the row for good.
        return SealContext(tenant_id, TOKENS, column, config_id)

    def store_oauth_token(
        self,
        tenant_id: str,
        config_id: str,
        *,
        access_token: str,
        refresh_token: str | None = None,
        token_type: str = "Bearer",  # noqa: S107 - a token type, not a token
        expires_at: datetime | None = None,
        scopes: Sequence[str] = (),
        session: Session | None = None,
    ) -> None:
        """Seal and upsert a config's tokens (the one token row of the config)."""
        if not isinstance(access_token, str) or not access_token:
            raise InvalidInputError("access_token: required")
        if refresh_token is not None and (not isinstance(refresh_token, str) or not refresh_token):
            raise InvalidInputError("refresh_token: must be a non-empty string or None")
        if expires_at is not None and expires_at.tzinfo is None:
            raise InvalidInputError("expires_at: must be timezone-aware")
        if not token_type or any(not isinstance(x, str) or not x for x in scopes):
            raise InvalidInputError("scopes: each scope must be a non-empty string")
        with self._scope(tenant_id, session) as s:
            self._live(s, tenant_id, config_id)
            key = self.keyring.active_key(s.connection(), tenant_id)
            access = seal(
                key,
                access_token.encode(),
                self._token_context(tenant_id, config_id, "encrypted_access_token"),
            )
            refresh = (
                None
                if refresh_token is None
                else seal(
                    key,
                    refresh_token.encode(),
                    self._token_context(tenant_id, config_id, "encrypted_refresh_token"),
                )
            )
            values = {
                "encrypted_access_token": access,
                "encrypted_refresh_token": refresh,
                "token_type": token_type,
                "expires_at": expires_at,
                "scopes": list(scopes),
            }
            s.execute(
                pg_insert(EmailProviderToken)
                .values(id=new_id(), tenant_id=tenant_id, config_id=config_id, **values)
                .on_conflict_do_update(
                    index_elements=[EmailProviderToken.tenant_id, EmailProviderToken.config_id],
                    set_=values,
                )
            )
            log.info("token stored tenant=%s config=%s", tenant_id, config_id)

    def load_oauth_token(
        self, tenant_id: str, config_id: str, *, session: Session | None = None
    ) -> OAuthToken:
        """A config's tokens, opened. Raises NotFoundError when it has none."""
        with self._scope(tenant_id, session) as s:
            row = s.scalars(queries.token_of_config(tenant_id, config_id)).one_or_none()
            if row is None or row.encrypted_access_token is None:
                raise NotFoundError(f"config {config_id} of tenant {tenant_id} has no OAuth token")
            access = self._open(
                s,
                row.encrypted_access_token,
                self._token_context(tenant_id, config_id, "encrypted_access_token"),
            )
            refresh = None
            if row.encrypted_refresh_token is not None:
                refresh = self._open(
                    s,
                    row.encrypted_refresh_token,
                    self._token_context(tenant_id, config_id, "encrypted_refresh_token"),
                )
            return OAuthToken(
                config_id=config_id,
                access_token=SecretStr(access.decode()),
                refresh_token=None if refresh is None else SecretStr(refresh.decode()),
                token_type=row.token_type,
                expires_at=row.expires_at,
                scopes=tuple(row.scopes),
            )

    def delete_oauth_token(
        self, tenant_id: str, config_id: str, *, session: Session | None = None
    ) -> bool:
        """Remove a config's tokens; True if there were any."""
        with self._scope(tenant_id, session) as s:
            deleted = s.execute(queries.delete_tokens_of_config(tenant_id, config_id))
            return bool(getattr(deleted, "rowcount", 0))

    def tokens_expiring(
        self,
        tenant_id: str,
        *,
        within: timedelta,
        now: datetime | None = None,
        session: Session | None = None,
    ) -> list[ExpiringToken]:
        """The tenant's tokens whose access token expires within ``within`` of ``now``."""
        moment = now or datetime.now(UTC)
        with self._scope(tenant_id, session) as s:
            rows = s.scalars(queries.tokens_expiring(tenant_id, moment + within)).all()
            return [
                ExpiringToken(r.config_id, r.expires_at, r.encrypted_refresh_token is not None)
                for r in rows
                if r.expires_at is not None
            ]


def _integrity(exc: IntegrityError, tenant_id: str, name: str) -> Exception:
    text = str(exc.orig)
    if "uq_email_provider_configs_tenant_id_name_live" in text:
        return InvalidInputError(
            f"name: tenant {tenant_id} already has a live config named {name!r}"
        )
    if "fk_email_provider_configs_tenant_id_tenants" in text:
        return NotFoundError(f"tenant {tenant_id} does not exist")
    return InvalidInputError("the row breaks a database constraint")


__all__ = ["DecryptionError", "ExpiringToken", "OAuthToken", "ProviderConfig", "Vault"]
