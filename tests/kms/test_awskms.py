"""AWS KMS as the key provider, against moto's server over real HTTP (the session's
``aws_kms`` fixture): round trip, tenant binding, rotation and rewrap, per-item
failures in a batch, an unreachable or silent endpoint within the timeout, a caller
the KMS refuses (moto's IAM enforcement), and what ``status`` shows of the key.

moto enforces less than AWS: Decrypt under a disabled key or a key pending deletion
succeeds there, and a key policy is checked on DescribeKey only. Those gaps are
pinned below (a moto that starts enforcing fails them, and the docs change), and
the provider's answer to the errors AWS gives then is checked on the errors
themselves, with a stub client."""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import requests
from botocore.exceptions import ClientError

from tenantvault.errors import (
    DecryptionError,
    KeyProviderError,
    KeyProviderRefused,
    KeyProviderUnavailable,
)
from tenantvault.kms.awskms import TENANT_CONTEXT, AwsKmsKeyProvider
from tenantvault.kms.factory import awskms_client, key_provider_from_settings
from tenantvault.kms.provider import kek_version_of
from tenantvault.settings import load_settings

URL = "postgresql://app@db.internal/app"

pytestmark = pytest.mark.usefixtures("aws_kms")


def _admin() -> Any:
    return boto3.client("kms")


def _new_key(**kwargs: Any) -> str:
    return str(_admin().create_key(**kwargs)["KeyMetadata"]["KeyId"])


def _provider(key_id: str | None = None, **settings: Any) -> AwsKmsKeyProvider:
    """The provider the settings build (factory, boto3's own settings from the fixture)."""
    built = key_provider_from_settings(
        load_settings(
            database_url=URL, key_provider="awskms", awskms_key_id=key_id or _new_key(), **settings
        )
    )
    assert isinstance(built, AwsKmsKeyProvider)
    return built


def _tampered(wrapped: str) -> str:
    prefix, blob = wrapped.rsplit(":", 1)
    raw = bytearray(base64.b64decode(blob))
    raw[-1] ^= 0x01  # the end of the ciphertext, not the key id moto keeps in front
    return f"{prefix}:{base64.b64encode(bytes(raw)).decode()}"


def test_a_data_key_round_trips_and_its_wrapping_names_the_kek_version() -> None:
    provider = _provider()
    plaintext, wrapped = provider.generate_data_key("t_a")
    assert len(plaintext) == 32
    assert wrapped.ciphertext.startswith("awskms:v1:")
    assert wrapped.kek_version == kek_version_of(wrapped.ciphertext) == 1
    assert provider.unwrap("t_a", wrapped.ciphertext) == plaintext
    assert [r.plaintext for r in provider.unwrap_many([("t_a", wrapped.ciphertext)])] == [plaintext]
    assert "plaintext" not in repr(provider).lower()


def test_a_wrapped_key_moved_to_another_tenant_does_not_unwrap() -> None:
    provider = _provider()
    _, wrapped = provider.generate_data_key("t_a")
    with pytest.raises(DecryptionError):
        provider.unwrap("t_b", wrapped.ciphertext)
    [moved] = provider.unwrap_many([("t_b", wrapped.ciphertext)])
    assert moved.plaintext is None
    assert moved.error == "cannot unwrap data key"
    # What binds it: the tenant in the encryption context, under the documented key.
    blob = base64.b64decode(wrapped.ciphertext.split(":", 2)[2])
    opened = _admin().decrypt(CiphertextBlob=blob, EncryptionContext={TENANT_CONTEXT: "t_a"})
    assert len(opened["Plaintext"]) == 32


def test_a_wrapped_key_of_another_kms_key_does_not_unwrap() -> None:
    mine, other = _provider(), _provider()
    _, wrapped = other.generate_data_key("t_a")
    with pytest.raises((DecryptionError, KeyProviderRefused)):
        mine.unwrap("t_a", wrapped.ciphertext)


def test_another_kms_key_shares_the_client_and_wraps_a_key_made_elsewhere() -> None:
    """The hooks a tenant's own KEK needs: a sibling provider for another key, and
    wrapping a data key made by another KEK (moving a tenant's keys)."""
    deployment = _provider()
    tenant_key = _new_key()
    own = deployment.for_key(tenant_key)
    assert (own.ref, own._client) == (f"awskms:{tenant_key}", deployment._client)
    plaintext, _ = deployment.generate_data_key("t_a")
    moved = own._wrap_key("t_a", plaintext)
    assert moved.ciphertext.startswith("awskms:v1:")
    assert own.unwrap("t_a", moved.ciphertext) == plaintext
    with pytest.raises(DecryptionError):
        own.unwrap("t_b", moved.ciphertext)


def test_rotation_makes_a_new_version_and_rewrap_moves_keys_to_it() -> None:
    provider = _provider()
    plaintext, wrapped = provider.generate_data_key("t_a")
    assert provider.kek_version() == 1
    assert provider.rotate_kek() == 2
    assert provider.kek_version() == 2
    [result] = provider.rewrap([("t_a", wrapped.ciphertext)])
    assert result.wrapped is not None
    assert result.wrapped.ciphertext.startswith("awskms:v2:")
    assert result.wrapped.kek_version == 2
    assert provider.unwrap("t_a", result.wrapped.ciphertext) == plaintext
    # AWS keeps every backing version: the old wrapping still opens, and cannot be barred.
    assert provider.unwrap("t_a", wrapped.ciphertext) == plaintext
    assert provider.min_decryption_version() == 1
    with pytest.raises(KeyProviderError, match="min_decryption_version stays 1"):
        provider.set_min_decryption_version(2)
    _, newer = provider.generate_data_key("t_b")
    assert newer.kek_version == 2


def test_a_batch_with_bad_items_fails_only_those_items() -> None:
    provider = _provider(awskms_concurrency=4)
    keys = {f"t_{n}": provider.generate_data_key(f"t_{n}") for n in range(6)}
    items = [(tenant, wrapped.ciphertext) for tenant, (_, wrapped) in keys.items()]
    items[1] = ("t_1", _tampered(items[1][1]))
    items[2] = ("t_1", items[2][1])  # t_2's key, asked for as t_1's
    items[3] = ("t_3", "vault:v1:bm90IGFuIGF3cyBibG9i")  # another provider's wrapping
    items[4] = ("t_4", "awskms:v1:not base64!")
    results = provider.unwrap_many(items)
    assert [r.tenant_id for r in results] == [t for t, _ in items]
    assert results[0].plaintext == keys["t_0"][0]
    assert results[5].plaintext == keys["t_5"][0]
    for failed in results[1:5]:
        assert failed.plaintext is None
        assert failed.error
    assert results[3].error == "wrapped key was not made by AWS KMS"
    rewrapped = provider.rewrap(items)
    assert [r.wrapped is not None for r in rewrapped] == [True, False, False, False, False, True]
    assert all("rewrap refused by AWS KMS" in (r.error or "") for r in rewrapped[1:5])


def test_batches_are_split_at_the_batch_size_and_keep_their_order() -> None:
    provider = _provider(transit_batch_size=3, awskms_concurrency=2)
    keys = [provider.generate_data_key(f"t_{n}") for n in range(7)]
    results = provider.unwrap_many([(f"t_{n}", w.ciphertext) for n, (_, w) in enumerate(keys)])
    assert [r.plaintext for r in results] == [p for p, _ in keys]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def _at(endpoint: str, monkeypatch: pytest.MonkeyPatch, timeout: float) -> AwsKmsKeyProvider:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    return _provider("alias/nowhere", vault_timeout_seconds=timeout, awskms_concurrency=8)


@pytest.mark.parametrize("where", ["closed_port", "silent_endpoint"])
def test_an_endpoint_that_does_not_answer_is_unavailable_within_the_timeout(
    where: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = request.getfixturevalue(where)
    endpoint = f"http://127.0.0.1:{value}" if where == "closed_port" else value
    provider = _at(endpoint, monkeypatch, timeout=1.0)
    wrapped = "awskms:v1:" + base64.b64encode(b"x" * 64).decode()
    calls = [
        lambda: provider.unwrap("t_a", wrapped),
        lambda: provider.unwrap_many([(f"t_{n}", wrapped) for n in range(40)]),
        lambda: provider.generate_data_key("t_a"),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(KeyProviderUnavailable, match=r"AWS KMS at http://127\.0\.0\.1:\d+"):
            call()
        # One timeout (and the last retry's wait), not one per item or per retry.
        assert time.monotonic() - started < 1.0 + 0.8


@pytest.fixture
def iam_enforced(aws_kms: str) -> Iterator[dict[str, str]]:
    """Credentials of an IAM user that may use KMS except kms:Decrypt and
    kms:ReEncrypt*, with moto enforcing IAM for as long as the test runs."""
    iam = boto3.client("iam")
    name = f"app-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=name)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "kms:*", "Resource": "*"},
            {"Effect": "Deny", "Action": ["kms:Decrypt", "kms:ReEncrypt*"], "Resource": "*"},
        ],
    }
    iam.put_user_policy(UserName=name, PolicyName="no-decrypt", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    requests.post(f"{aws_kms}/moto-api/reset-auth", data=b"0", timeout=5).raise_for_status()
    try:
        yield {
            "aws_access_key_id": key["AccessKeyId"],
            "aws_secret_access_key": key["SecretAccessKey"],
        }
    finally:
        requests.post(f"{aws_kms}/moto-api/reset-auth", data=b"inf", timeout=5).raise_for_status()


def test_a_caller_denied_decrypt_gets_key_provider_refused(
    iam_enforced: dict[str, str],
) -> None:
    # Made while IAM is enforced: the user may create keys and generate data keys.
    admin_like = boto3.client("kms", aws_session_token=None, **iam_enforced)
    key_id = str(admin_like.create_key()["KeyMetadata"]["KeyId"])
    settings = load_settings(database_url=URL, key_provider="awskms", awskms_key_id=key_id)
    client = boto3.client(
        "kms", aws_session_token=None, config=awskms_client(settings).meta.config, **iam_enforced
    )
    provider = AwsKmsKeyProvider(client, key_id=key_id, timeout_seconds=2)
    plaintext, wrapped = provider.generate_data_key("t_a")
    assert len(plaintext) == 32
    items = [("t_a", wrapped.ciphertext), ("t_b", wrapped.ciphertext)]
    with pytest.raises(KeyProviderRefused, match=rf"refused this caller the key {key_id}"):
        provider.unwrap("t_a", wrapped.ciphertext)
    with pytest.raises(KeyProviderRefused):
        provider.unwrap_many(items)
    with pytest.raises(KeyProviderRefused):
        provider.rewrap(items)


def test_status_shows_a_usable_key_with_its_versions() -> None:
    provider = _provider()
    provider.rotate_kek()
    status = provider.status()
    assert (status.kind, status.reachable, status.ready) == ("aws kms", True, True)
    assert status.key_versions == (1, 2)
    assert status.summary == "key enabled, may wrap and unwrap"


def test_status_shows_a_disabled_or_deleted_key_as_missing() -> None:
    disabled, pending = _new_key(), _new_key()
    _admin().disable_key(KeyId=disabled)
    _admin().schedule_key_deletion(KeyId=pending, PendingWindowInDays=7)
    for key_id, state in ((disabled, "Disabled"), (pending, "PendingDeletion")):
        status = _provider(key_id).status()
        assert (status.reachable, status.ready, status.key_versions) == (True, False, None)
        assert status.key_detail == f"missing: the AWS KMS key {key_id} is {state}"


def test_status_shows_a_key_policy_that_denies_describing_it_as_not_checked() -> None:
    # moto checks a key policy on DescribeKey (only): the one it can show.
    deny = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "kms:*", "Resource": "*"}],
    }
    key_id = _new_key(Policy=json.dumps(deny))
    status = _provider(key_id).status()
    assert (status.reachable, status.ready) == (True, False)
    assert status.key_detail.startswith("not checked: ")
    assert "AccessDeniedException" in status.key_detail


def test_status_shows_an_unreachable_kms(closed_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    status = _at(f"http://127.0.0.1:{closed_port}", monkeypatch, timeout=0.5).status()
    assert (status.reachable, status.ready) == (False, False)
    assert status.detail == "unreachable (no connection)"


def test_moto_does_not_refuse_decrypt_under_a_disabled_or_pending_deletion_key() -> None:
    """The gap the docs name: AWS refuses these (DisabledException,
    KMSInvalidStateException); moto serves them. When moto starts refusing, this fails:
    then test the refusal here instead."""
    for revoke in ("disable", "delete"):
        key_id = _new_key()
        provider = _provider(key_id)
        plaintext, wrapped = provider.generate_data_key("t_a")
        if revoke == "disable":
            _admin().disable_key(KeyId=key_id)
        else:
            _admin().schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
        assert provider.unwrap("t_a", wrapped.ciphertext) == plaintext


def test_the_audit_mac_is_made_and_checked_by_an_hmac_key() -> None:
    mac_key = _new_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
    provider = _provider(awskms_audit_key_id=mac_key)
    mac = provider.mac(b"tenant t_a starts at seq 7")
    assert mac.startswith("awskms:v1:")
    assert provider.verify_mac(b"tenant t_a starts at seq 7", mac)
    assert not provider.verify_mac(b"tenant t_a starts at seq 8", mac)
    assert not provider.verify_mac(b"tenant t_a starts at seq 7", mac[:-4] + "AAA=")
    with pytest.raises(KeyProviderError, match="TENANTVAULT_AWSKMS_AUDIT_KEY_ID is not set"):
        _provider().mac(b"x")


# --- what AWS answers and moto does not: the errors themselves, from a stub client ---


class _Refusing:
    """A KMS client whose Decrypt and ReEncrypt answer with one AWS error code."""

    class meta:  # noqa: N801 - boto3's attribute name
        endpoint_url = "https://kms.example.invalid"

    def __init__(self, code: str) -> None:
        self.code = code

    def _refuse(self, operation: str) -> Any:
        raise ClientError({"Error": {"Code": self.code, "Message": "secret-free"}}, operation)

    def decrypt(self, **_: Any) -> Any:
        return self._refuse("Decrypt")

    def re_encrypt(self, **_: Any) -> Any:
        return self._refuse("ReEncrypt")

    def list_key_rotations(self, **_: Any) -> Any:
        return {"Rotations": [], "Truncated": False}


WRAPPED = "awskms:v1:" + base64.b64encode(b"blob" * 16).decode()


@pytest.mark.parametrize(
    ("code", "says"),
    [
        ("DisabledException", "the AWS KMS key is disabled"),
        ("KMSInvalidStateException", "not in a usable state (pending deletion?)"),
        ("NotFoundException", "the AWS KMS key does not exist"),
        ("InvalidCiphertextException", ""),
        ("IncorrectKeyException", ""),
    ],
)
def test_a_refused_item_fails_itself_and_names_only_the_key_state(code: str, says: str) -> None:
    provider = AwsKmsKeyProvider(_Refusing(code), key_id="alias/k")
    with pytest.raises(DecryptionError, match="cannot unwrap data key") as single:
        provider.unwrap("t_a", WRAPPED)
    assert says in str(single.value)
    [item] = provider.unwrap_many([("t_a", WRAPPED)])
    assert item.plaintext is None
    assert item.error is not None
    assert says in item.error
    assert "secret-free" not in item.error
    [rewrapped] = provider.rewrap([("t_a", WRAPPED)])
    assert rewrapped.wrapped is None


@pytest.mark.parametrize("code", ["AccessDeniedException", "UnrecognizedClientException"])
def test_a_refused_caller_is_key_provider_refused(code: str) -> None:
    provider = AwsKmsKeyProvider(_Refusing(code), key_id="alias/k")
    with pytest.raises(KeyProviderRefused, match=code):
        provider.unwrap("t_a", WRAPPED)
    with pytest.raises(KeyProviderRefused):
        provider.unwrap_many([("t_a", WRAPPED), ("t_b", WRAPPED)])


@pytest.mark.parametrize("code", ["KMSInternalException", "ThrottlingException"])
def test_a_failing_service_is_retried_then_unavailable(code: str) -> None:
    slept: list[float] = []
    provider = AwsKmsKeyProvider(
        _Refusing(code), key_id="alias/k", timeout_seconds=1, sleep=slept.append
    )
    with pytest.raises(KeyProviderUnavailable, match=code):
        provider.unwrap("t_a", WRAPPED)
    assert slept[:3] == [0.05, 0.1, 0.2]
