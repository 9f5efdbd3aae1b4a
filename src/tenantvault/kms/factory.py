"""Build the configured key provider: Vault transit (token or AppRole) or local."""

from __future__ import annotations

import base64
import binascii

import hvac
import requests

from tenantvault.errors import ConfigurationError, KeyProviderUnavailable
from tenantvault.kms.local import LocalKeyProvider
from tenantvault.kms.provider import CheckedKeyProvider
from tenantvault.kms.transit import TransitKeyProvider
from tenantvault.settings import Settings


def transit_client(settings: Settings) -> hvac.Client:
    """An hvac client for ``VAULT_ADDR``, logged in with ``VAULT_TOKEN`` or AppRole."""
    if settings.vault_addr is None:
        raise ConfigurationError("VAULT_ADDR is required for TENANTVAULT_KEY_PROVIDER=vault")
    verify: bool | str = not settings.vault_skip_verify
    if settings.vault_cacert and verify:
        verify = settings.vault_cacert
    client = hvac.Client(
        url=str(settings.vault_addr),
        namespace=settings.vault_namespace,
        timeout=settings.vault_timeout_seconds,
        verify=verify,
    )
    if settings.vault_token is not None:
        client.token = settings.vault_token.get_secret_value()
    elif settings.vault_approle_role_id and settings.vault_approle_secret_id:
        try:
            client.auth.approle.login(
                role_id=settings.vault_approle_role_id,
                secret_id=settings.vault_approle_secret_id.get_secret_value(),
                mount_point=settings.vault_approle_mount,
            )
        except requests.exceptions.RequestException:
            raise KeyProviderUnavailable("transit unavailable for AppRole login") from None
        except hvac.exceptions.VaultError:
            raise ConfigurationError(
                "AppRole login refused: check TENANTVAULT_VAULT_APPROLE_ROLE_ID and _SECRET_ID"
            ) from None
    else:
        raise ConfigurationError(
            "VAULT_TOKEN, or TENANTVAULT_VAULT_APPROLE_ROLE_ID and _SECRET_ID, are required"
        )
    return client


def key_provider_from_settings(settings: Settings) -> CheckedKeyProvider:
    """The key provider the settings choose. Local is used only when asked for by name."""
    if settings.key_provider == "local":
        if settings.local_master_key is None:
            raise ConfigurationError(
                "TENANTVAULT_LOCAL_MASTER_KEY is required with TENANTVAULT_KEY_PROVIDER=local"
            )
        try:
            master = base64.b64decode(settings.local_master_key.get_secret_value(), validate=True)
        except (binascii.Error, ValueError):
            master = b""
        if len(master) != 32:
            raise ConfigurationError("TENANTVAULT_LOCAL_MASTER_KEY must be base64 of 32 bytes")
        return LocalKeyProvider(master, batch_size=settings.transit_batch_size)
    return TransitKeyProvider(
        transit_client(settings),
        key_name=settings.transit_key,
        mount_point=settings.transit_mount,
        timeout_seconds=settings.vault_timeout_seconds,
        batch_size=settings.transit_batch_size,
    )
