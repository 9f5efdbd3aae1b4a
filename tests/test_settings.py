"""Settings: defaults, and errors that name the variable but never its value."""

from __future__ import annotations

from pathlib import Path

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


def test_a_dotenv_file_in_the_working_directory_is_not_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "TENANTVAULT_DATABASE_URL=postgresql://x@db/app\n"
        "TENANTVAULT_KEY_PROVIDER=local\n"
        "VAULT_ADDR=https://attacker.example\n"
    )
    with pytest.raises(ConfigurationError, match="TENANTVAULT_DATABASE_URL is required"):
        load_settings()
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", SECRET_URL)
    settings = load_settings()
    assert (settings.key_provider, settings.vault_addr) == ("vault", None)


def test_a_dotenv_file_is_read_when_named_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / "tenantvault.env"
    env_file.write_text(f"TENANTVAULT_DATABASE_URL={SECRET_URL}\nTENANTVAULT_SCHEMA_NAME=app\n")
    monkeypatch.setenv("TENANTVAULT_ENV_FILE", str(env_file))
    monkeypatch.setenv("TENANTVAULT_SCHEMA_NAME", "from_env")
    settings = load_settings()
    assert (settings.database_url.get_secret_value(), settings.schema_name) == (
        SECRET_URL,
        "from_env",
    )
    monkeypatch.setenv("TENANTVAULT_ENV_FILE", str(tmp_path / "missing.env"))
    with pytest.raises(ConfigurationError, match="TENANTVAULT_ENV_FILE"):
        load_settings()


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("http://127.0.0.1:8200", True),
        ("http://localhost:8200", True),
        ("http://[::1]:8200", True),
        ("https://vault.internal:8200", True),
        ("http://vault.internal:8200", False),
        ("http://10.0.0.5:8200", False),
    ],
)
def test_plain_http_vault_is_refused_off_loopback_unless_allowed(
    monkeypatch: pytest.MonkeyPatch, address: str, allowed: bool
) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", SECRET_URL)
    monkeypatch.setenv("VAULT_ADDR", address)
    if allowed:
        assert load_settings().vault_addr is not None
        return
    with pytest.raises(ConfigurationError, match="VAULT_ADDR is plain http to another host"):
        load_settings()
    monkeypatch.setenv("TENANTVAULT_ALLOW_PLAIN_HTTP_VAULT", "true")
    assert load_settings().vault_addr is not None


def test_read_replica_urls_are_checked_one_by_one_without_echoing_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", SECRET_URL)
    monkeypatch.setenv(
        "TENANTVAULT_READ_DATABASE_URLS",
        "postgresql://app:hunter2-secret@standby1/app, mysql://app:hunter2-secret@standby2/app",
    )
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert "TENANTVAULT_READ_DATABASE_URLS URL 2 must be a postgresql:// URL" in str(error.value)
    assert "hunter2" not in str(error.value)
    monkeypatch.setenv(
        "TENANTVAULT_READ_DATABASE_URLS",
        "postgresql://app:hunter2-secret@standby1/app,postgres://app@standby2:5433/app",
    )
    settings = load_settings()
    assert [(u.drivername, u.host, u.port) for u in settings.read_urls] == [
        ("postgresql+psycopg", "standby1", None),
        ("postgresql+psycopg", "standby2", 5433),
    ]
    assert "hunter2" not in repr(settings)
    assert settings.read_max_lag_ms == 1000
    assert load_settings(read_database_urls=None).read_urls == ()


@pytest.mark.usefixtures("clean_environment")
def test_vault_addrs_lists_a_clusters_nodes_each_checked_like_vault_addr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", SECRET_URL)
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:8200")
    assert load_settings().vault_nodes == ("http://127.0.0.1:8200",)
    monkeypatch.setenv(
        "TENANTVAULT_VAULT_ADDRS", "https://bao-1.example:8200, https://bao-2.example:8200/"
    )
    assert load_settings().vault_nodes == (
        "https://bao-1.example:8200",
        "https://bao-2.example:8200",
    )
    monkeypatch.setenv("TENANTVAULT_VAULT_ADDRS", "http://127.0.0.1:8200,http://bao-2.example")
    with pytest.raises(
        ConfigurationError, match="TENANTVAULT_VAULT_ADDRS is plain http to another host"
    ):
        load_settings()
