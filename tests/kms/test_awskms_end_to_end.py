"""A deployment on AWS KMS (moto's server over HTTP) and the suite's real PostgreSQL:
``Vault.from_settings`` with ``TENANTVAULT_KEY_PROVIDER=awskms`` stores and loads,
``tenantvault rotate-keys kek`` rotates the KMS key and rewraps every data key,
``tenantvault status`` reports the key, and a missing boto3 is one FAILED: line."""

from __future__ import annotations

import re
import socket
import sys
import time

import boto3
import pytest
import sqlalchemy as sa

from tenantvault import Vault, cli
from tenantvault.errors import KeyProviderUnavailable
from tenantvault.settings import Settings, load_settings

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}


@pytest.fixture
def key_id(aws_kms: str) -> str:
    return str(boto3.client("kms").create_key()["KeyMetadata"]["KeyId"])


@pytest.fixture
def aws_vault(app_settings: Settings, key_id: str) -> Vault:
    """The application's Vault, its key provider built from the settings: AWS KMS."""
    settings = load_settings(
        database_url=app_settings.database_url.get_secret_value(),
        key_provider="awskms",
        awskms_key_id=key_id,
    )
    vault = Vault.from_settings(settings)
    yield vault  # type: ignore[misc]
    vault.dispose()


@pytest.fixture
def operator_environment(migrated: Settings, key_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VAULT_ADDR", "VAULT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", migrated.database_url.get_secret_value())
    monkeypatch.setenv("TENANTVAULT_KEY_PROVIDER", "awskms")
    monkeypatch.setenv("TENANTVAULT_AWSKMS_KEY_ID", key_id)


def _wrapped_keys(owner_engine: sa.Engine) -> list[tuple[str, int]]:
    with owner_engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT wrapped_key, kek_version FROM dripiq_app.tenant_data_keys ORDER BY 1")
        )
        return [(wrapped, kek) for wrapped, kek in rows]


def test_a_vault_on_aws_kms_stores_loads_and_survives_a_kek_rotation(
    aws_vault: Vault,
    operator_environment: None,
    owner_engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
) -> None:
    opened = {}
    for tenant in ("t_a", "t_b"):
        cfg = aws_vault.create_config(
            tenant, type="smtp", name="Office", config=SMTP, credentials={"password": "p0"}
        )
        aws_vault.store_credentials(tenant, cfg.id, {"password": f"{tenant}-secret"})
        opened[tenant] = cfg.id
        creds = aws_vault.load_credentials(tenant, cfg.id)
        assert creds.password.get_secret_value() == f"{tenant}-secret"  # type: ignore[union-attr]
    before = _wrapped_keys(owner_engine)
    assert len(before) == 2
    assert all(w.startswith("awskms:v1:") and k == 1 for w, k in before)

    assert cli.main(["rotate-keys", "kek"]) == cli.EXIT_OK
    capsys.readouterr()
    after = _wrapped_keys(owner_engine)
    assert all(w.startswith("awskms:v2:") and k == 2 for w, k in after)
    assert {w for w, _ in after}.isdisjoint(w for w, _ in before)

    aws_vault.keyring.cache.clear()  # what a process started now sees: keys from the KMS
    for tenant, config_id in opened.items():
        creds = aws_vault.load_credentials(tenant, config_id)
        assert creds.password.get_secret_value() == f"{tenant}-secret"  # type: ignore[union-attr]

    assert cli.main(["status"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert re.search(
        r"^aws kms +http://127\.0\.0\.1:\d+: reachable, key enabled, may wrap and unwrap$",
        out,
        re.M,
    )
    assert re.search(
        r"^data keys +wrapped under KEK v2\.\.v2; the AWS KMS key \S+ unwraps v1\.\.v2$", out, re.M
    )


def test_an_unreachable_aws_kms_fails_loads_within_the_timeout_then_backs_off(
    aws_vault: Vault, app_settings: Settings, key_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = aws_vault.create_config(
        "t_a", type="smtp", name="Office", config=SMTP, credentials={"password": "p0"}
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", nowhere)
    cold = Vault.from_settings(
        load_settings(
            database_url=app_settings.database_url.get_secret_value(),
            key_provider="awskms",
            awskms_key_id=key_id,
            vault_timeout_seconds=1,
        )
    )
    try:
        started = time.monotonic()
        with pytest.raises(KeyProviderUnavailable, match=f"AWS KMS at {nowhere}"):
            cold.load_credentials("t_a", cfg.id)
        assert time.monotonic() - started < 1.8
        # The backoff gate (keys/backoff.py) shuts: the next miss fails without a call.
        started = time.monotonic()
        with pytest.raises(KeyProviderUnavailable, match="until its backoff ends"):
            cold.load_credentials("t_a", cfg.id)
        assert time.monotonic() - started < 0.2
    finally:
        cold.dispose()


def test_raising_min_decryption_version_on_aws_kms_fails_with_one_clear_line(
    aws_vault: Vault,
    operator_environment: None,
    owner_engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = aws_vault.create_config(
        "t_a", type="smtp", name="Office", config=SMTP, credentials={"password": "p0"}
    )
    assert cfg.id
    code = cli.main(["rotate-keys", "kek", "--min-decryption-version"])
    assert code == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "FAILED: AWS KMS keeps every version of a key able to decrypt" in err
    assert "Traceback" not in err
    # The rewrap before it was committed: nothing is left behind.
    assert all(k == 2 for _, k in _wrapped_keys(owner_engine))


def test_awskms_without_boto3_is_one_failed_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 now raises ImportError
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", "postgresql://app@127.0.0.1:1/app")
    monkeypatch.setenv("TENANTVAULT_KEY_PROVIDER", "awskms")
    monkeypatch.setenv("TENANTVAULT_AWSKMS_KEY_ID", "alias/tenantvault")
    assert cli.main(["rotate-keys", "kek"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.strip() == (
        "FAILED: TENANTVAULT_KEY_PROVIDER=awskms needs boto3: pip install 'tenantvault[aws]'"
    )
