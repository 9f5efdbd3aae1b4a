"""Build the configured key provider: Vault transit (token or AppRole), AWS KMS, or
local; and ask a provider that reports its own health for it (``status``)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import hvac
import requests

from tenantvault.errors import ConfigurationError, KeyProviderError, KeyProviderUnavailable
from tenantvault.kms.failover import FailoverAdapter
from tenantvault.kms.keks import Resolve, split_ref
from tenantvault.kms.local import LocalKeyProvider
from tenantvault.kms.provider import CheckedKeyProvider, KeyProvider, KmsStatus
from tenantvault.kms.transit import TransitKeyProvider
from tenantvault.settings import Settings, is_loopback

if TYPE_CHECKING:
    from tenantvault.kms.awskms import AwsKmsKeyProvider

Login = Callable[[hvac.Client], float]


def transit_client(settings: Settings) -> hvac.Client:
    """An hvac client for ``VAULT_ADDR``, logged in with ``VAULT_TOKEN`` or AppRole, once.
    A long-running process should use :func:`key_provider_from_settings`, which logs in
    again before an AppRole token expires."""
    client = _client(settings)
    login = _approle_login(settings)
    if login is None:
        assert settings.vault_token is not None
        client.token = settings.vault_token.get_secret_value()
    else:
        login(client)
    return client


def _client(settings: Settings) -> hvac.Client:
    """A client over the transit server's nodes (one with VAULT_ADDR): each request goes
    to one that answers (kms/failover.py)."""
    nodes = settings.vault_nodes
    if not nodes:
        raise ConfigurationError(
            "VAULT_ADDR (or TENANTVAULT_VAULT_ADDRS) is required for TENANTVAULT_KEY_PROVIDER=vault"
        )
    verify: bool | str = not settings.vault_skip_verify
    if settings.vault_cacert and verify:
        verify = settings.vault_cacert
    return hvac.Client(
        url=nodes[0],
        namespace=settings.vault_namespace,
        timeout=settings.vault_timeout_seconds,
        verify=verify,
        adapter=FailoverAdapter,
        nodes=nodes,
    )


def _approle_login(settings: Settings) -> Login | None:
    """The AppRole login the settings name (None with ``VAULT_TOKEN``): it logs a client
    in and returns how many seconds the token is valid."""
    if settings.vault_token is not None:
        return None
    role_id, secret_id = settings.vault_approle_role_id, settings.vault_approle_secret_id
    if not (role_id and secret_id):
        raise ConfigurationError(
            "VAULT_TOKEN, or TENANTVAULT_VAULT_APPROLE_ROLE_ID and _SECRET_ID, are required"
        )

    def login(client: hvac.Client) -> float:
        try:
            answer = client.auth.approle.login(
                role_id=role_id,
                secret_id=secret_id.get_secret_value(),
                mount_point=settings.vault_approle_mount,
            )
        except requests.exceptions.RequestException:
            raise KeyProviderUnavailable(
                f"could not log in with AppRole: transit at {client.url.rstrip('/')} is unreachable"
            ) from None
        except hvac.exceptions.VaultError:
            raise ConfigurationError(
                "AppRole login refused: check TENANTVAULT_VAULT_APPROLE_ROLE_ID and _SECRET_ID"
            ) from None
        # 0 means no expiry: log in again hourly anyway, so a revoked token is replaced.
        return float(answer["auth"].get("lease_duration") or 3600)

    return login


def key_provider_from_settings(settings: Settings) -> CheckedKeyProvider:
    """The key provider the settings choose. Local only when named and acknowledged."""
    if settings.key_provider == "local":
        return _local(settings)
    if settings.key_provider == "awskms":
        return _awskms(settings)
    return _transit(settings)


def _transit(settings: Settings) -> TransitKeyProvider:
    client = _client(settings)
    login = _approle_login(settings)
    if login is None:
        assert settings.vault_token is not None
        client.token = settings.vault_token.get_secret_value()
    return TransitKeyProvider(
        client,
        key_name=settings.transit_key,
        mount_point=settings.transit_mount,
        timeout_seconds=settings.vault_timeout_seconds,
        batch_size=settings.transit_batch_size,
        login=login,
        mac_key=settings.audit_transit_key,
    )


def _local(settings: Settings) -> LocalKeyProvider:
    if not settings.local_key_provider_is_for_development:
        raise ConfigurationError(
            "TENANTVAULT_KEY_PROVIDER=local keeps the master key beside the data: for "
            "development and tests only; set TENANTVAULT_LOCAL_KEY_PROVIDER_IS_FOR_DEVELOPMENT"
            "=true to acknowledge it"
        )
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


def provider_status(settings: Settings) -> KmsStatus | None:
    """The status of a provider that reports its own (never raises); None for transit,
    whose status kms/health.py reads (and for local, which has none of its own)."""
    if settings.key_provider != "awskms":
        return None
    try:
        provider = _awskms(settings)
    except ConfigurationError as exc:
        return KmsStatus("aws kms", None, False, False, str(exc))
    return provider.status()


def awskms_client(settings: Settings) -> Any:  # boto3 ships no types
    """A boto3 KMS client from boto3's own settings (region, credentials, endpoint),
    with botocore's retries off and both timeouts at TENANTVAULT_VAULT_TIMEOUT_SECONDS:
    the provider retries transient failures itself, inside that timeout."""
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError
    except ImportError:
        raise ConfigurationError(
            "TENANTVAULT_KEY_PROVIDER=awskms needs boto3: pip install 'tenantvault[aws]'"
        ) from None
    config = Config(
        connect_timeout=settings.vault_timeout_seconds,
        read_timeout=settings.vault_timeout_seconds,
        retries={"total_max_attempts": 1},
        max_pool_connections=settings.awskms_concurrency,
    )
    try:
        return boto3.session.Session().client("kms", config=config)
    except BotoCoreError as exc:  # no region, or a malformed endpoint
        raise ConfigurationError(
            f"AWS KMS client: {exc} (set AWS_REGION or AWS_DEFAULT_REGION)"
            if "region" in str(exc).lower()
            else f"AWS KMS client: {type(exc).__name__}"
        ) from None


def _awskms(settings: Settings, key_id: str | None = None) -> AwsKmsKeyProvider:
    """The AWS KMS provider of ``key_id`` (the deployment's, TENANTVAULT_AWSKMS_KEY_ID,
    when None)."""
    key_id = key_id or settings.awskms_key_id
    if key_id is None:
        raise ConfigurationError(
            "TENANTVAULT_AWSKMS_KEY_ID is required with TENANTVAULT_KEY_PROVIDER=awskms"
        )
    client = awskms_client(settings)  # first: it says when boto3 is missing
    endpoint = urlsplit(str(client.meta.endpoint_url))
    plain = endpoint.scheme == "http" and not is_loopback(endpoint.hostname or "")
    if plain and not settings.allow_plain_http_vault:
        raise ConfigurationError(
            "AWS_ENDPOINT_URL is plain http to another host (credentials' signatures and "
            "data keys would cross the network in clear): use https, or set "
            "TENANTVAULT_ALLOW_PLAIN_HTTP_VAULT=true"
        )
    from tenantvault.kms.awskms import AwsKmsKeyProvider

    return AwsKmsKeyProvider(
        client,
        key_id=key_id,
        mac_key_id=settings.awskms_audit_key_id,
        timeout_seconds=settings.vault_timeout_seconds,
        batch_size=settings.transit_batch_size,
        concurrency=settings.awskms_concurrency,
    )


def kek_resolver(settings: Settings, wrap: Callable[[KeyProvider], KeyProvider]) -> Resolve:
    """The providers of KEK references other than the deployment's (tenants' own
    keys), each wrapped by ``wrap`` (metering). One client per KMS, from the settings
    (transit: VAULT_ADDR and its token; AWS KMS: boto3's own), made on first use and
    shared by all its keys."""
    transit: list[TransitKeyProvider] = []
    awskms: list[AwsKmsKeyProvider] = []

    def resolve(ref: str) -> KeyProvider:
        scheme, key = split_ref(ref)
        if scheme == "transit":
            if not transit:
                transit.append(_transit(settings))
            return wrap(transit[0].for_key(key))
        if scheme == "awskms":
            if not awskms:
                awskms.append(_awskms(settings, key))
            return wrap(awskms[0].for_key(key))
        raise KeyProviderError(f"no key provider for '{scheme}:' KEK references")

    return resolve
