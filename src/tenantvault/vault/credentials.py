"""Credentials: storing them (a credential rotation) and loading them — the hot path."""

from __future__ import annotations

from collections.abc import Sequence
from time import perf_counter
from typing import Any, Generic

from tenantvault.db import queries
from tenantvault.db.models import AuditAction
from tenantvault.db.session import check_tenant_id
from tenantvault.errors import DecryptionError, InvalidInputError, NotFoundError
from tenantvault.keys.keyring import Keyring
from tenantvault.keys.sealed import CONFIG_CREDENTIALS, stored_config_digest
from tenantvault.vault.configs import ConfigService
from tenantvault.vault.core import CallerSession, VaultCore, log_unopenable
from tenantvault.vault.methods import FacadeMethods, Runs
from tenantvault.vault.providers import CredentialsModel, credentials_from_storage, provider_type
from tenantvault.vault.versions import checked_note


class CredentialService(Generic[CallerSession]):
    """A config's secret credentials."""

    def __init__(
        self, core: VaultCore[CallerSession], configs: ConfigService[CallerSession]
    ) -> None:
        self._core = core
        self._configs = configs

    def store_credentials(
        self,
        tenant_id: str,
        config_id: str,
        credentials: Any,
        *,
        actor: str | None = None,
        reason: str | None = None,
        expected_version: int | None = None,
        session: CallerSession | None = None,
    ) -> int:
        """Validate and seal new credentials for a live config: credential rotation.

        The config gets a new version; the old credentials stay in its history
        (within the retention bound). Returns the new version.

        Raises:
            ConcurrentModification: ``expected_version`` is given and the config moved on.
        """
        with self._core.metrics.timed_store():
            return self._configs.update_config(
                tenant_id,
                config_id,
                credentials=credentials,
                actor=actor,
                reason=reason,
                expected_version=expected_version,
                session=session,
            ).version

    def load_credentials(
        self,
        tenant_id: str,
        config_id: str,
        *,
        actor: str | None = None,
        session: CallerSession | None = None,
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
        started = perf_counter()
        if not self._core.audit_loads:
            fast = self._load_credentials_one_round_trip(tenant_id, config_id, session)
            if fast is not None:
                self._core.metrics.loaded(started)
                return fast
        actor = checked_note("actor", actor)
        with self._core.scope(tenant_id, session) as s:
            row = self._core.live(s, tenant_id, config_id, lock=False)
            opened = self._core.open_credentials(s, row)
            if self._core.audit_loads:
                self._core.audit_config(s, row, AuditAction.CREDENTIALS_REVEALED, actor)
        self._core.metrics.loaded(started)
        return opened

    def _load_credentials_one_round_trip(
        self, tenant_id: str, config_id: str, session: CallerSession | None
    ) -> CredentialsModel | None:
        """The hot path: one statement scopes the tenant and reads the row (migration
        0009's function); the key comes from the cache. None when it is not cached (or
        this vault holds no connections), and the caller takes the full path, which may
        ask the key provider."""
        ran, row = self._core.one_statement(
            self._core.load_sql, hot_load_parameters(tenant_id, config_id), session
        )
        return finish_hot_load(self._core.keyring, tenant_id, config_id, row) if ran else None

    def load_many_credentials(
        self, tenant_id: str, config_ids: Sequence[str], *, session: CallerSession | None = None
    ) -> dict[str, CredentialsModel]:
        """Credentials of many configs of one tenant: one query, one key fetch per key version."""
        with self._core.scope(tenant_id, session) as s:
            rows = s.scalars(queries.configs_by_ids(tenant_id, list(config_ids))).all()
            sealer = self._core.sealer(s, tenant_id)
            return {
                r.id: self._core.open_credentials(s, r, sealer)
                for r in rows
                if r.encrypted_credentials
            }


class CredentialMethods(FacadeMethods[CallerSession]):
    """CredentialService's methods on both facades (:mod:`tenantvault.vault.methods`)."""

    store_credentials = Runs(CredentialService[CallerSession].store_credentials)
    load_credentials = Runs(CredentialService[CallerSession].load_credentials)
    load_many_credentials = Runs(CredentialService[CallerSession].load_many_credentials)


# --- the hot path's rules, shared by Vault (above) and AsyncVault (its held connections) ---


def hot_load_parameters(tenant_id: str, config_id: str) -> tuple[str, str]:
    """The parameters of the hot path's one statement (``queries.hot_load_sql``).

    Raises:
        InvalidInputError: ``tenant_id`` is malformed, or ``config_id`` holds a NUL
            character, which no text in PostgreSQL can (nothing is sent).
    """
    if isinstance(config_id, str) and "\x00" in config_id:
        raise InvalidInputError("config_id must not contain a NUL character")
    return check_tenant_id(tenant_id), config_id


def finish_hot_load(
    keyring: Keyring, tenant_id: str, config_id: str, row: Sequence[Any] | None
) -> CredentialsModel | None:
    """What the hot path's row becomes: the opened credentials, or None when the
    tenant's key is not cached, the value names a key older than the tenant's oldest
    usable one (the row's last column), or it is in an older format: the caller then
    takes the full path, which refuses a retired or destroyed key and asks the
    database whether an older value may open.

    Raises:
        NotFoundError: no such live config, or it holds no credentials.
        DecryptionError: the stored value does not open here (a warning names the config).
    """
    if row is None:
        raise NotFoundError(f"no live config {config_id} for tenant {tenant_id}")
    kind_name, version, config_json, sealed, oldest_usable_key = row
    if sealed is None:
        raise NotFoundError(f"config {config_id} of tenant {tenant_id} has no credentials")
    place = CONFIG_CREDENTIALS.place_digest(
        tenant_id, config_id, bound=(kind_name, version), digest=stored_config_digest(config_json)
    )
    try:
        opened = keyring.open_cached(
            tenant_id, sealed, place, oldest_usable_version=oldest_usable_key
        )
    except DecryptionError:
        log_unopenable(tenant_id, config_id, version)
        raise
    if opened is None:
        return None
    # The config and the cross-checks against it were validated when these
    # credentials were stored; the hot path rebuilds only the credentials model.
    return credentials_from_storage(provider_type(kind_name), opened)
