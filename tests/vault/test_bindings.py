"""Credentials are bound to their config and version, tokens to their version: a row
rewritten or replayed by SQL (an injection, a leaked application login) never yields
the secret beside a config it was not sealed with. Values in the old format open only
while allowed, are counted, and are re-sealed by rotation. Real PostgreSQL (as the
application role) and real OpenBao."""

from __future__ import annotations

import base64
import logging
import os
import struct
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tenantvault import DecryptionError, Vault
from tenantvault.db.session import tenant_session
from tenantvault.keys.keyring import Keyring
from tenantvault.rotation.dek import NOT_RECORDED, rotate_data_keys
from tenantvault.rotation.options import DekRotationOptions
from tenantvault.rotation.shred import shred_tenant
from tenantvault.rotation.status import key_status
from tenantvault.settings import Settings
from tests.async_support import sync_provider
from tests.conftest import CountingProvider, fresh_keyring
from tests.support import record_as_the_upgrade, write_as_app

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}
PASSWORD = "the-real-smtp-password"


def _copy_back(app_url: str, owner_engine: sa.Engine, statement: str, **params: object) -> None:
    """Put an old sealed value back into its row at the row's version: the application's
    login is refused (migration 0015); the operator's role, which re-seals in place, is
    not, and the value must still not open there (its binding)."""
    with pytest.raises(
        psycopg.errors.IntegrityConstraintViolation, match="may change only with a new version"
    ):
        write_as_app(app_url, statement, **params)
    with owner_engine.begin() as connection:
        connection.exec_driver_sql(statement, params)


def _password(creds: Any) -> str:
    return str(creds.password.get_secret_value())


@pytest.mark.parametrize(
    "rewrite",
    [
        'config = config || \'{"host": "smtp.attacker.example"}\'',
        "config = jsonb_set(config, '{tls}', '{\"reject_unauthorized\": false}')",
        "version = version + 1",
    ],
    ids=["host", "tls", "version"],
)
def test_a_config_rewritten_by_sql_never_comes_back_with_the_credentials(
    vault: Vault, app_url: str, caplog: pytest.LogCaptureFixture, rewrite: str
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": PASSWORD}
    )
    assert _password(vault.load_credentials("t_a", cfg.id)) == PASSWORD  # warm: hot path
    write_as_app(
        app_url,
        f"UPDATE dripiq_app.email_provider_configs SET {rewrite} WHERE id = %(id)s",
        id=cfg.id,
    )
    caplog.set_level(logging.WARNING, logger="tenantvault")
    with pytest.raises(DecryptionError):
        vault.load_credentials("t_a", cfg.id)  # the one-round-trip load
    with pytest.raises(DecryptionError):
        vault.get_config("t_a", cfg.id, with_credentials=True)
    vault.keyring.cache.clear()
    with pytest.raises(DecryptionError):
        vault.load_credentials("t_a", cfg.id)  # the full path
    assert f"credentials of config {cfg.id}" in caplog.text
    assert PASSWORD not in caplog.text
    assert "attacker" not in caplog.text


def test_an_old_secret_copied_back_into_the_live_row_does_not_open(
    vault: Vault, owner_engine: sa.Engine, app_url: str
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": "old"}
    )
    with owner_engine.connect() as connection:
        backup = connection.execute(
            sa.text("SELECT encrypted_credentials FROM dripiq_app.email_provider_configs"),
        ).scalar_one()
    vault.store_credentials("t_a", cfg.id, {"password": "new"})  # a credential rotation
    # From a backup of the row, or from the history row of version 1.
    for old in (backup, _history_value(owner_engine, 1)):
        _copy_back(
            app_url,
            owner_engine,
            "UPDATE dripiq_app.email_provider_configs SET encrypted_credentials = %(v)s "
            "WHERE id = %(id)s",
            v=old,
            id=cfg.id,
        )
        vault.keyring.cache.clear()
        with pytest.raises(DecryptionError):
            vault.load_credentials("t_a", cfg.id)


def _history_value(owner_engine: sa.Engine, version: int) -> str:
    with owner_engine.connect() as connection:
        return str(
            connection.execute(
                sa.text(
                    "SELECT encrypted_credentials FROM dripiq_app.email_provider_config_versions "
                    "WHERE version = :v"
                ),
                {"v": version},
            ).scalar_one()
        )


def test_an_old_token_copied_back_does_not_open(
    vault: Vault, owner_engine: sa.Engine, app_url: str
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="OAuth relay", config={**SMTP, "auth_type": "oauth2"}
    )
    vault.store_oauth_token("t_a", cfg.id, access_token="access-1", refresh_token="refresh-1")
    with owner_engine.connect() as connection:
        old = connection.execute(
            sa.text(
                "SELECT encrypted_access_token, encrypted_refresh_token "
                "FROM dripiq_app.email_provider_tokens"
            )
        ).one()
    assert vault.store_oauth_token("t_a", cfg.id, access_token="access-2") == 2
    assert vault.load_oauth_token("t_a", cfg.id).access_token.get_secret_value() == "access-2"  # type: ignore[union-attr]
    _copy_back(
        app_url,
        owner_engine,
        "UPDATE dripiq_app.email_provider_tokens SET encrypted_access_token = %(a)s, "
        "encrypted_refresh_token = %(r)s WHERE config_id = %(id)s",
        a=old[0],
        r=old[1],
        id=cfg.id,
    )
    with pytest.raises(DecryptionError):
        vault.load_oauth_token("t_a", cfg.id)


def test_legitimate_changes_reseal_and_every_version_still_opens(vault: Vault) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": "one"}
    )
    vault.update_config("t_a", cfg.id, name="Relay 2")  # a name alone: a new version
    vault.update_config("t_a", cfg.id, config={**SMTP, "host": "smtp2.example.com"})
    vault.store_credentials("t_a", cfg.id, {"password": "two"})
    vault.rollback_config("t_a", cfg.id, 1)
    vault.keyring.cache.clear()
    assert _password(vault.load_credentials("t_a", cfg.id)) == "one"
    opened = [
        _password(vault.get_config_version("t_a", cfg.id, v, with_credentials=True).credentials)
        for v in range(1, 6)
    ]
    assert opened == ["one", "one", "one", "two", "one"]


# --- values sealed in the old format (1): bound to their place only ---


def _seal_format_1(
    key: Any, plaintext: bytes, tenant: str, table: str, column: str, row: str
) -> str:
    """A format-1 value as the previous release wrote it (built here from the layout)."""
    header = f"tv1.{key.version}."
    parts = [b"tenantvault.sealed.v1", header.encode(), tenant.encode()]
    parts += [f"{table}.{column}".encode(), row.encode()]
    aad = b"".join(struct.pack(">I", len(p)) + p for p in parts)
    nonce = os.urandom(12)
    body = AESGCM(key.material()).encrypt(nonce, plaintext, aad)
    return header + base64.urlsafe_b64encode(nonce + body).decode().rstrip("=")


def _legacy_config(vault: Vault, owner_engine: sa.Engine, *, recorded: bool = True) -> str:
    """A config whose credentials are a format-1 value; ``recorded``: as if it was there
    when the upgrade to format 3 recorded the older values (otherwise written after)."""
    cfg = vault.create_config(
        "t_a", type="smtp", name="From 0.1", config=SMTP, credentials={"password": "legacy"}
    )
    with tenant_session(vault.engine, "t_a") as session:
        # A keyring of the test's own on the vault's sync provider: it reads the key the
        # vault made (an AsyncVault's keyring runs only inside its event loop).
        key = fresh_keyring(sync_provider(vault))._active_key(session.connection(), "t_a")
    value = _seal_format_1(
        key,
        b'{"password":"legacy"}',
        "t_a",
        "email_provider_configs",
        "encrypted_credentials",
        cfg.id,
    )
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.email_provider_configs SET encrypted_credentials = :v "
                "WHERE id = :id"
            ),
            {"v": value, "id": cfg.id},
        )
    if recorded:
        record_as_the_upgrade(owner_engine, "t_a")
    return cfg.id


def test_old_format_values_open_while_allowed_are_counted_and_resealed_by_rotation(
    vault: Vault,
    owner_engine: sa.Engine,
    operator_db: Any,
    provider: CountingProvider,
    app_settings: Settings,
) -> None:
    config_id = _legacy_config(vault, owner_engine)
    vault.keyring.cache.clear()
    assert _password(vault.load_credentials("t_a", config_id)) == "legacy"
    strict = Vault.from_settings(
        app_settings.model_copy(update={"open_legacy_format": False}), key_provider=provider
    )
    try:
        with pytest.raises(DecryptionError):
            strict.load_credentials("t_a", config_id)
        status = key_status(operator_db, provider, ["t_a"])
        assert (status.legacy_values, status.malformed_values) == (1, 0)
        # Re-sealing alone: no new data key, the old-format value moves to format 2.
        report = rotate_data_keys(
            operator_db, fresh_keyring(provider), ["t_a"], DekRotationOptions(new_key=False)
        )
        assert report.ok, report
        assert [(t.outcome, t.from_version, t.to_version) for t in report.tenants] == [
            ("resealed", 1, 1)
        ]
        assert key_status(operator_db, provider, ["t_a"]).legacy_values == 0
        strict.keyring.cache.clear()
        assert _password(strict.load_credentials("t_a", config_id)) == "legacy"
    finally:
        strict.dispose()


def test_a_rotation_refusing_the_old_format_reports_it_and_launders_nothing(
    vault: Vault, owner_engine: sa.Engine, operator_db: Any, provider: CountingProvider
) -> None:
    config_id = _legacy_config(vault, owner_engine)
    strict = Keyring(provider, fresh_keyring(provider).cache, allow_legacy=False)
    report = rotate_data_keys(operator_db, strict, ["t_a"], DekRotationOptions(new_key=False))
    assert not report.ok
    assert [(u.column, u.row) for u in report.unopenable] == [
        ("email_provider_configs.encrypted_credentials", config_id)
    ]
    with owner_engine.connect() as connection:
        value = connection.execute(
            sa.text("SELECT encrypted_credentials FROM dripiq_app.email_provider_configs")
        ).scalar_one()
    assert value.startswith("tv1.")


def test_a_rewritten_config_is_refused_before_new_credentials_are_bound_to_it(
    vault: Vault, app_url: str, owner_engine: sa.Engine
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": PASSWORD}
    )
    write_as_app(
        app_url,
        "UPDATE dripiq_app.email_provider_configs "
        "SET config = jsonb_set(config, '{host}', '\"smtp.attacker.example\"') WHERE id = %(id)s",
        id=cfg.id,
    )
    # The routine credential rotation after it: refused, nothing written.
    with pytest.raises(DecryptionError):
        vault.store_credentials("t_a", cfg.id, {"password": "rotated"})
    with pytest.raises(DecryptionError):
        vault.update_config("t_a", cfg.id, name="Renamed")
    with owner_engine.connect() as connection:
        version = connection.execute(
            sa.text("SELECT version FROM dripiq_app.email_provider_configs")
        ).scalar_one()
    assert version == 1
    with pytest.raises(DecryptionError):
        vault.load_credentials("t_a", cfg.id)


def test_tokens_of_a_deleted_grant_do_not_open_in_the_next_one(
    vault: Vault, owner_engine: sa.Engine, app_url: str
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="OAuth relay", config={**SMTP, "auth_type": "oauth2"}
    )
    assert vault.store_oauth_token("t_a", cfg.id, access_token="grant-1", refresh_token="r1") == 1
    with owner_engine.connect() as connection:
        old = connection.execute(
            sa.text(
                "SELECT encrypted_access_token, encrypted_refresh_token "
                "FROM dripiq_app.email_provider_tokens"
            )
        ).one()
    assert vault.delete_oauth_token("t_a", cfg.id)
    assert vault.store_oauth_token("t_a", cfg.id, access_token="grant-2", refresh_token="r2") == 1
    _copy_back(
        app_url,
        owner_engine,
        "UPDATE dripiq_app.email_provider_tokens SET encrypted_access_token = %(a)s, "
        "encrypted_refresh_token = %(r)s WHERE config_id = %(id)s",
        a=old[0],
        r=old[1],
        id=cfg.id,
    )
    with pytest.raises(DecryptionError):
        vault.load_oauth_token("t_a", cfg.id)


def test_old_format_values_under_a_shredded_key_do_not_keep_rotation_incomplete(
    vault: Vault, owner_engine: sa.Engine, operator_db: Any, provider: CountingProvider
) -> None:
    _legacy_config(vault, owner_engine)
    shred_tenant(operator_db, "t_a")
    vault.keyring.cache.clear()
    vault.create_config(
        "t_a", type="smtp", name="after", config=SMTP, credentials={"password": "new"}
    )
    report = rotate_data_keys(operator_db, fresh_keyring(provider), ["t_a"])
    assert report.ok, report
    assert report.unopenable == []


# --- older formats are closed in the database (migration 0013), not per process ---


def _credentials_value(owner_engine: sa.Engine) -> str:
    with owner_engine.connect() as connection:
        return str(
            connection.execute(
                sa.text("SELECT encrypted_credentials FROM dripiq_app.email_provider_configs")
            ).scalar_one()
        )


def test_an_older_value_put_in_after_the_upgrade_is_refused_and_never_resealed(
    vault: Vault, owner_engine: sa.Engine, operator_db: Any, provider: CountingProvider
) -> None:
    config_id = _legacy_config(vault, owner_engine, recorded=False)
    for path in ("hot", "full"):
        if path == "full":
            vault.keyring.cache.clear()
        with pytest.raises(DecryptionError):
            vault.load_credentials("t_a", config_id)
        with pytest.raises(DecryptionError):
            vault.open_config("t_a", config_id)
    status = key_status(operator_db, provider, ["t_a"])
    assert (status.legacy_values, status.refused_values, status.legacy_open) == (1, 1, True)
    report = rotate_data_keys(
        operator_db, fresh_keyring(provider), ["t_a"], DekRotationOptions(new_key=False)
    )
    assert not report.ok
    assert [(u.column, u.row, u.error) for u in report.unopenable] == [
        ("email_provider_configs.encrypted_credentials", config_id, NOT_RECORDED)
    ]
    assert _credentials_value(owner_engine).startswith("tv1.")


def test_a_recorded_older_value_beside_a_rewritten_config_is_not_laundered_by_reseal(
    vault: Vault,
    owner_engine: sa.Engine,
    operator_db: Any,
    provider: CountingProvider,
    app_url: str,
) -> None:
    """The review's path: the app's login rewrites the config beside a format-1 value,
    and the operator's --reseal-only would bind it to the hostile config."""
    config_id = _legacy_config(vault, owner_engine)
    write_as_app(
        app_url,
        "UPDATE dripiq_app.email_provider_configs "
        'SET config = config || \'{"host": "smtp.attacker.example"}\' WHERE id = %(id)s',
        id=config_id,
    )
    vault.keyring.cache.clear()
    with pytest.raises(DecryptionError):
        vault.load_credentials("t_a", config_id)
    report = rotate_data_keys(
        operator_db, fresh_keyring(provider), ["t_a"], DekRotationOptions(new_key=False)
    )
    assert [(u.row, u.error) for u in report.unopenable] == [(config_id, NOT_RECORDED)]
    assert _credentials_value(owner_engine).startswith("tv1.")


def test_a_whole_reseal_closes_older_formats_for_the_application_and_the_operator(
    vault: Vault, owner_engine: sa.Engine, operator_db: Any, provider: CountingProvider
) -> None:
    config_id = _legacy_config(vault, owner_engine)
    legacy_value = _credentials_value(owner_engine)
    report = rotate_data_keys(
        operator_db, fresh_keyring(provider), None, DekRotationOptions(new_key=False)
    )
    assert report.ok, report
    assert report.legacy_closed is True
    status = key_status(operator_db, provider)
    assert (status.legacy_values, status.legacy_open) == (0, False)
    assert _password(vault.load_credentials("t_a", config_id)) == "legacy"
    # The recorded value itself, put back: the switch is closed, so it no longer opens.
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE dripiq_app.email_provider_configs SET encrypted_credentials = :v"),
            {"v": legacy_value},
        )
    for path in ("hot", "full"):
        if path == "full":
            vault.keyring.cache.clear()
        with pytest.raises(DecryptionError):
            vault.load_credentials("t_a", config_id)
    report = rotate_data_keys(
        operator_db, fresh_keyring(provider), ["t_a"], DekRotationOptions(new_key=False)
    )
    assert [(u.row, u.error) for u in report.unopenable] == [(config_id, NOT_RECORDED)]
