"""A config and its secrets as one verified read: what an application sends mail with.

``open_config`` reads a live config row and its token row in one statement (one
snapshot, migration 0013's function) and opens the credentials and the tokens
against that very row: its type, version and config. So the host, endpoint or
authority the application uses is the one the secrets were sealed with; reading
the config with ``get_config`` and the secret with ``load_credentials`` apart
would let a writer change the config in between.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from time import perf_counter
from typing import Any, Generic, NoReturn, TypeVar

from sqlalchemy.orm import Session

from tenantvault import audit
from tenantvault.crypto.envelope import SealContext
from tenantvault.db.models import AuditAction
from tenantvault.db.session import fetch_one_in
from tenantvault.errors import DecryptionError, InvalidInputError, NotFoundError
from tenantvault.keys.keyring import Keyring
from tenantvault.keys.sealed import CONFIG_CREDENTIALS, stored_config_digest
from tenantvault.vault.core import CallerSession, VaultCore, log_unopenable
from tenantvault.vault.credentials import hot_load_parameters
from tenantvault.vault.methods import FacadeMethods, Runs
from tenantvault.vault.providers import (
    CredentialsModel,
    ProviderConfigModel,
    config_from_storage,
    credentials_from_storage,
    provider_type,
)
from tenantvault.vault.tokens import HotToken, OAuthToken, opened_token
from tenantvault.vault.views import ProviderConfig

Opener = Callable[[str, SealContext], bytes | None]
Config = TypeVar("Config", bound=ProviderConfigModel)
Credentials = TypeVar("Credentials", bound=CredentialsModel)
Model = TypeVar("Model")


@dataclass(frozen=True)
class OpenedConfig:
    """A live config with its secrets, all read in one snapshot and all verified
    against that one config: send with ``config`` exactly what ``credentials`` and
    ``token`` belong to.

    ``credentials``: the typed credentials model (secrets as ``SecretStr``), None for
    a config without them. ``token``: the config's OAuth tokens, None without a grant.
    :meth:`config_as` and :meth:`credentials_as` give the config and the credentials
    as the models of the provider the caller sends with, typed and checked.
    """

    config: ProviderConfig
    credentials: CredentialsModel | None
    token: OAuthToken | None

    def config_as(self, model: type[Config]) -> Config:
        """The config's model as ``model`` (``SmtpConfig``, ...).

        Raises:
            InvalidInputError: the config is another provider's (the message names both
                types and the config's id, never its content).
        """
        return _expect(self.config, self.config.config, model)

    def credentials_as(self, model: type[Credentials]) -> Credentials:
        """The credentials as ``model`` (``SmtpCredentials``, ...).

        Raises:
            NotFoundError: the config holds no credentials.
            InvalidInputError: the config is another provider's.
        """
        if self.credentials is None:
            raise NotFoundError(
                f"config {self.config.id} of tenant {self.config.tenant_id} has no credentials"
            )
        return _expect(self.config, self.credentials, model)

    def __reduce__(self) -> NoReturn:
        raise TypeError("OpenedConfig refuses to be pickled")


def _expect(config: ProviderConfig, value: object, model: type[Model]) -> Model:
    """``value``, part of ``config``, if it is a ``model``."""
    if not isinstance(value, model):
        raise InvalidInputError(
            f"model: config {config.id} of tenant {config.tenant_id} is a {config.type.value} "
            f"config ({type(value).__name__}), not {model.__name__}"
        )
    return value


class OpeningService(Generic[CallerSession]):
    """A config opened with its secrets (``open_config``)."""

    def __init__(self, core: VaultCore[CallerSession]) -> None:
        self._core = core

    def open_config(
        self, tenant_id: str, config_id: str, *, session: CallerSession | None = None
    ) -> OpenedConfig:
        """A live config, its credentials and its OAuth token, verified together.

        The call to send mail with: the credentials and the token open only beside
        the config returned (its type, version and content), never beside one a
        writer changed. One statement when the tenant's key is cached.

        Raises:
            NotFoundError: no such live config.
            DecryptionError: a stored secret does not open beside this config.
            KeyProviderUnavailable: the tenant's key is not cached and transit is down.
        """
        started = perf_counter()
        params = hot_load_parameters(tenant_id, config_id)
        if not self._core.audit_loads:
            ran, row = self._core.one_statement(self._core.open_sql, params, session)
            if ran:
                opened = finish_hot_open(self._core.keyring, tenant_id, config_id, row)
                if opened is not None:
                    self._core.metrics.loaded(started)
                    return opened
        with self._core.scope(tenant_id, session) as s:
            opened = open_verified(self._core, s, tenant_id, config_id)
            if self._core.audit_loads and opened.credentials is not None:
                audit.record(
                    s.connection(),
                    tenant_id,
                    AuditAction.CREDENTIALS_REVEALED,
                    actor=None,
                    target_type="config",
                    target_id=config_id,
                    details={},
                )
        self._core.metrics.loaded(started)
        return opened


def open_verified(
    core: VaultCore[Any], session: Session, tenant_id: str, config_id: str
) -> OpenedConfig:
    """``open_config``'s full path in ``session``'s transaction (the tenant's key loaded
    if need be): how the core itself reads a config it acts on, such as the token
    endpoint a refresh token is sent to. Raises as ``open_config``."""
    row = fetch_one_in(session, core.open_sql, hot_load_parameters(tenant_id, config_id))
    opened = finish_open(core.sealer(session, tenant_id).open, tenant_id, config_id, row)
    assert opened is not None  # a sealer opens or raises
    return opened


class OpeningMethods(FacadeMethods[CallerSession]):
    """OpeningService's methods on both facades (:mod:`tenantvault.vault.methods`)."""

    open_config = Runs(OpeningService[CallerSession].open_config)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC)


def finish_hot_open(
    keyring: Keyring, tenant_id: str, config_id: str, row: Sequence[Any] | None
) -> OpenedConfig | None:
    """``open_config``'s row opened with the cached keys only (None when a key is not
    cached or older than the tenant's oldest usable one, or a value is in an older
    format: the caller takes the full path). Raises as :func:`finish_open`."""
    oldest = None if row is None else row[-1]
    opener = partial(keyring.open_cached, tenant_id, oldest_usable_version=oldest)
    return finish_open(opener, tenant_id, config_id, row)


def finish_open(
    open_: Opener, tenant_id: str, config_id: str, row: Sequence[Any] | None
) -> OpenedConfig | None:
    """What ``open_config``'s row becomes, its secrets opened by ``open_`` (a sealer's,
    or the key cache's: None when the key is not cached, and the caller takes the
    full path).

    Raises:
        NotFoundError: no such live config.
        DecryptionError: a stored secret does not open beside this config.
    """
    if row is None:
        raise NotFoundError(f"no live config {config_id} for tenant {tenant_id}")
    (kind_name, name, config_json, is_default, is_active, created_at, updated_at, version,
     sealed, *token_row) = row  # fmt: skip
    kind = provider_type(kind_name)
    digest = stored_config_digest(config_json)
    credentials = None
    if sealed is not None:
        place = CONFIG_CREDENTIALS.place_digest(
            tenant_id, config_id, bound=(kind_name, version), digest=digest
        )
        try:
            plaintext = open_(sealed, place)
        except DecryptionError:
            log_unopenable(tenant_id, config_id, version)
            raise
        if plaintext is None:
            return None
        credentials = credentials_from_storage(kind, plaintext)
    token = None
    if token_row[0] is not None:
        hot = HotToken.of(config_id, token_row)
        token = opened_token(open_, tenant_id, hot, kind, digest)
        if token is None:
            return None
    config = ProviderConfig(
        id=config_id,
        tenant_id=tenant_id,
        type=kind,
        name=name,
        config=config_from_storage(kind, config_json),
        is_default=is_default,
        is_active=is_active,
        created_at=_aware(created_at),
        updated_at=_aware(updated_at),
        has_credentials=sealed is not None,
        version=version,
    )
    return OpenedConfig(config, credentials, token)
