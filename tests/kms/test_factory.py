"""Choosing the key provider from settings: local only by name, with a proper key."""

from __future__ import annotations

import base64

import pytest

from tenantvault.errors import ConfigurationError
from tenantvault.kms.factory import key_provider_from_settings
from tenantvault.kms.local import LocalKeyProvider
from tenantvault.kms.transit import TransitKeyProvider
from tenantvault.settings import load_settings

URL = "postgresql://app@db.internal/app"


pytestmark = pytest.mark.usefixtures("clean_environment")


def test_the_default_is_vault_transit_and_it_needs_an_address() -> None:
    with pytest.raises(ConfigurationError, match="VAULT_ADDR"):
        key_provider_from_settings(load_settings(database_url=URL))


def test_vault_transit_is_built_from_the_vault_variables() -> None:
    provider = key_provider_from_settings(
        load_settings(database_url=URL, VAULT_ADDR="http://127.0.0.1:8200", VAULT_TOKEN="t")
    )
    assert isinstance(provider, TransitKeyProvider)
    assert provider.key_name == "tenantvault"


def test_vault_transit_without_a_token_or_approle_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="VAULT_TOKEN"):
        key_provider_from_settings(
            load_settings(database_url=URL, VAULT_ADDR="http://127.0.0.1:8200")
        )


def test_local_is_refused_unless_acknowledged_as_development_only() -> None:
    good = base64.b64encode(bytes(range(32))).decode()
    with pytest.raises(ConfigurationError, match="LOCAL_KEY_PROVIDER_IS_FOR_DEVELOPMENT"):
        key_provider_from_settings(
            load_settings(database_url=URL, key_provider="local", local_master_key=good)
        )


def test_local_needs_a_32_byte_master_key_and_never_echoes_it() -> None:
    dev = {"key_provider": "local", "local_key_provider_is_for_development": True}
    with pytest.raises(ConfigurationError, match="TENANTVAULT_LOCAL_MASTER_KEY is required"):
        key_provider_from_settings(load_settings(database_url=URL, **dev))
    short = base64.b64encode(b"too-short-secret").decode()
    with pytest.raises(ConfigurationError, match="32 bytes") as error:
        key_provider_from_settings(load_settings(database_url=URL, local_master_key=short, **dev))
    assert short not in str(error.value)
    good = base64.b64encode(bytes(range(32))).decode()
    provider = key_provider_from_settings(
        load_settings(database_url=URL, local_master_key=good, **dev)
    )
    assert isinstance(provider, LocalKeyProvider)


def test_aws_kms_needs_its_key_id() -> None:
    with pytest.raises(ConfigurationError, match="TENANTVAULT_AWSKMS_KEY_ID is required"):
        key_provider_from_settings(load_settings(database_url=URL, key_provider="awskms"))


def test_aws_kms_is_built_from_boto3s_settings_with_the_timeout_and_no_retries_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tenantvault.kms.awskms import AwsKmsKeyProvider

    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    provider = key_provider_from_settings(
        load_settings(
            database_url=URL,
            key_provider="awskms",
            awskms_key_id="alias/tenantvault",
            awskms_audit_key_id="alias/tenantvault-audit",
            vault_timeout_seconds=2.5,
        )
    )
    assert isinstance(provider, AwsKmsKeyProvider)
    assert (provider.key_id, provider.mac_key_id) == (
        "alias/tenantvault",
        "alias/tenantvault-audit",
    )
    assert provider.address == "https://kms.eu-west-1.amazonaws.com"
    config = provider._client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (2.5, 2.5)
    assert config.retries["total_max_attempts"] == 1


def test_aws_kms_without_boto3_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'tenantvault\[aws\]'"):
        key_provider_from_settings(
            load_settings(database_url=URL, key_provider="awskms", awskms_key_id="alias/k")
        )


def test_an_unknown_key_provider_is_named_with_the_choices() -> None:
    with pytest.raises(ConfigurationError, match=r"TENANTVAULT_KEY_PROVIDER.*'awskms'"):
        load_settings(database_url=URL, key_provider="gcpkms")


def test_aws_kms_over_plain_http_to_another_host_is_refused_unless_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://kms.internal:4566")
    aws = {"key_provider": "awskms", "awskms_key_id": "alias/k"}
    with pytest.raises(ConfigurationError, match="AWS_ENDPOINT_URL is plain http to another"):
        key_provider_from_settings(load_settings(database_url=URL, **aws))
    allowed = load_settings(database_url=URL, allow_plain_http_vault=True, **aws)
    assert key_provider_from_settings(allowed).address == "http://kms.internal:4566"  # type: ignore[attr-defined]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
    key_provider_from_settings(load_settings(database_url=URL, **aws))
