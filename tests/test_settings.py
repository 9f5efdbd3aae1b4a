"""Settings: defaults, and errors that name the variable but never its value."""

from __future__ import annotations

import pytest

from tenantvault.errors import ConfigurationError
from tenantvault.settings import Settings, load_settings

SECRET_URL = "postgresql://app:hunter2-secret@db.internal:5432/app"


pytestmark = pytest.mark.usefixtures("clean_environment")


def test_defaults_match_the_ticket_and_pin_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", SECRET_URL)
    settings = load_settings()
    assert settings.schema_name == "dripiq_app"
    assert settings.sqlalchemy_url.drivername == "postgresql+psycopg"
    assert settings.key_provider == "vault"


def test_missing_database_url_names_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="TENANTVAULT_DATABASE_URL is required"):
        load_settings()


def test_a_malformed_url_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", "mysql://app:hunter2-secret@db/app")
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert "TENANTVAULT_DATABASE_URL" in str(error.value)
    assert "hunter2" not in str(error.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TENANTVAULT_SCHEMA_NAME", "Robert'); DROP TABLE students;--"),
        ("TENANTVAULT_APP_ROLE", "App Role"),
        ("TENANTVAULT_DEK_CACHE_MAX_ENTRIES", "0"),
        ("TENANTVAULT_VAULT_TIMEOUT_SECONDS", "-1"),
        ("TENANTVAULT_KEY_PROVIDER", "plaintext"),
        ("VAULT_ADDR", "not a url"),
    ],
)
def test_each_malformed_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", SECRET_URL)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=variable) as error:
        load_settings()
    assert value not in str(error.value)


def test_secrets_stay_out_of_repr_and_display(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", SECRET_URL)
    monkeypatch.setenv("VAULT_TOKEN", "s.vault-token-secret")
    settings = load_settings()
    shown = (
        repr(settings)
        + str(settings)
        + settings.database_url_for_display()
        + repr(settings.sqlalchemy_url)
    )
    assert "hunter2" not in shown
    assert "vault-token-secret" not in shown
    assert settings.vault_token is not None
    assert settings.vault_token.get_secret_value() == "s.vault-token-secret"


def test_settings_are_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", SECRET_URL)
    settings: Settings = load_settings()
    with pytest.raises(Exception, match="frozen"):
        settings.schema_name = "other"  # type: ignore[misc]
