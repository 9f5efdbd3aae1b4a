"""Secrets never leak: not into the database, logs, reprs, exceptions or tracebacks."""

from __future__ import annotations

import base64
import logging
import pickle
import subprocess
import traceback
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tenantvault import DecryptionError, InvalidInputError, RefreshedToken, Vault
from tenantvault.dev.stack import postgres_bin_dir
from tenantvault.settings import Settings

SECRETS = {
    "api_key": "SG.leakcheck-id01.leakcheck-secret-0123456789",
    "password": "smtp-leakcheck-password-42",
    "client_secret": "graph-leakcheck-client-secret",
    "access": "ya29.leakcheck-access-token",
    "refresh": "1//leakcheck-refresh-token",
}


def _encodings(secret: str) -> list[str]:
    """The secret and its base64 forms at every alignment, as they could appear in text."""
    forms = [secret]
    raw = secret.encode()
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(raw[offset:]).decode().rstrip("=")
            forms.append(encoded[4:-4])  # drop the edges, which depend on neighbours
    return forms


def _store_everything(vault: Vault) -> dict[str, str]:
    sendgrid = vault.create_config(
        "t_a", type="sendgrid", name="SG", config={}, credentials={"api_key": SECRETS["api_key"]}
    )
    vault.create_config(
        "t_a",
        type="smtp",
        name="SMTP",
        config={
            "host": "smtp.example.com",
            "port": 587,
            "secure": False,
            "auth_type": "login",
            "user": "u",
        },
        credentials={"password": SECRETS["password"]},
    )
    graph = vault.create_config(
        "t_b",
        type="microsoft_graph",
        name="Graph",
        config={
            "azure_tenant_id": "contoso.onmicrosoft.com",
            "client_id": "0f0e0d0c-0b0a-4908-8706-050403020100",
            "scopes": ["https://graph.microsoft.com/.default"],
            "auth_type": "client_credentials",
        },
        credentials={"client_secret": SECRETS["client_secret"]},
    )
    vault.store_oauth_token(
        "t_b",
        graph.id,
        access_token=SECRETS["access"],
        refresh_token=SECRETS["refresh"],
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    return {"sendgrid": sendgrid.id, "graph": graph.id}


def test_a_full_pg_dump_holds_no_secret_nor_its_base64(vault: Vault, settings: Settings) -> None:
    ids = _store_everything(vault)
    assert (
        vault.load_credentials("t_a", ids["sendgrid"]).api_key.get_secret_value()
        == SECRETS["api_key"]
    )  # type: ignore[union-attr]
    url = settings.sqlalchemy_url.set(drivername="postgresql").render_as_string(hide_password=False)
    dump = subprocess.run(
        [str(postgres_bin_dir() / "pg_dump"), "--dbname", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "tv3.1." in dump  # the sealed values are there...
    for secret in SECRETS.values():
        for form in _encodings(secret):
            assert form not in dump  # ...and nothing they hide


def test_logs_at_debug_hold_no_secret(vault: Vault, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.DEBUG)
    try:
        ids = _store_everything(vault)
        vault.load_credentials("t_a", ids["sendgrid"])
        vault.load_oauth_token("t_b", ids["graph"])
    finally:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    assert "config created" in caplog.text  # the library does log
    for secret in SECRETS.values():
        for form in _encodings(secret):
            assert form not in caplog.text
    # Nor the sealed values and wrapped keys the statements carry: the engine hides
    # them. (At DEBUG, SQLAlchemy also logs result rows; that is the caller's choice.)
    statements = "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("sqlalchemy.engine") and r.levelno == logging.INFO
    )
    assert "SQL parameters hidden" in statements
    assert "tv3." not in statements
    assert "vault:v" not in statements


def test_reprs_of_everything_the_application_holds_hide_secrets(vault: Vault) -> None:
    ids = _store_everything(vault)
    shown = " ".join(
        repr(x) + str(x)
        for x in (
            vault,
            vault.keyring,
            vault.get_config("t_a", ids["sendgrid"], with_credentials=True),
            vault.load_credentials("t_b", ids["graph"]),
            vault.load_oauth_token("t_b", ids["graph"]),
            vault.keyring.cache.get("t_a", 1),
        )
    )
    assert "SecretStr('**********')" in shown
    for secret in SECRETS.values():
        assert secret not in shown


def test_errors_and_tracebacks_hold_no_secret(vault: Vault) -> None:
    with pytest.raises(InvalidInputError) as bad_port:
        vault.create_config(
            "t_a",
            type="smtp",
            name="x",
            config={
                "host": "smtp.example.com",
                "port": 465,
                "secure": False,
                "auth_type": "login",
                "user": "u",
            },
            credentials={"password": SECRETS["password"]},
        )
    with pytest.raises(InvalidInputError) as bad_key:
        vault.create_config(
            "t_a",
            type="sendgrid",
            name="x",
            config={},
            credentials={"api_key": SECRETS["password"]},
        )
    for error in (bad_port.value, bad_key.value):
        text = "".join(traceback.format_exception(error)) + repr(error)
        assert SECRETS["password"] not in text
        assert error.__cause__ is None
        assert error.__suppress_context__


def test_a_tampered_value_raises_the_one_decryption_error(
    vault: Vault, owner_engine: sa.Engine
) -> None:
    ids = _store_everything(vault)
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.email_provider_configs SET encrypted_credentials = "
                "left(encrypted_credentials, -3) || 'AAA' WHERE id = :id"
            ),
            {"id": ids["sendgrid"]},
        )
    with pytest.raises(DecryptionError) as error:
        vault.load_credentials("t_a", ids["sendgrid"])
    assert str(error.value) == "cannot open sealed value"
    assert error.value.__cause__ is None


def test_nothing_the_application_holds_with_a_secret_pickles(vault: Vault) -> None:
    ids = _store_everything(vault)
    with Session(vault.engine) as session, session.begin():
        holders = [
            vault.get_config("t_a", ids["sendgrid"], with_credentials=True),
            vault.load_credentials("t_b", ids["graph"]),
            vault.load_oauth_token("t_b", ids["graph"]),
            RefreshedToken(access_token=SECRETS["access"], expires_at=None),
            vault.keyring.cache.get("t_a", 1),
            vault.keyring.cache,
            vault.keyring.sealer(session.connection(), "t_a"),
        ]
    for holder in holders:
        assert holder is not None
        with pytest.raises(TypeError, match="pickle"):
            pickle.dumps(holder)
