"""The operator command: thin over the library, one FAILED: line on errors, no secrets."""

from __future__ import annotations

import re

import pytest

from tenantvault import cli
from tenantvault.db.models import TENANTVAULT_TABLES
from tenantvault.settings import Settings


def test_migrate_then_status_reports_an_isolated_up_to_date_schema(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", settings.database_url.get_secret_value())
    assert settings.vault_addr is not None
    assert settings.vault_token is not None
    monkeypatch.setenv("VAULT_ADDR", str(settings.vault_addr))
    monkeypatch.setenv("VAULT_TOKEN", settings.vault_token.get_secret_value())
    assert cli.main(["migrate"]) == cli.EXIT_OK
    assert "none -> 0009_sealed_bindings" in capsys.readouterr().out
    assert cli.main(["status"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "up to date" in out
    assert out.count("RLS forced, 2 policies, 0 rows visible") == len(TENANTVAULT_TABLES)
    assert re.search(r"^transit +http\S+: reachable, engine mounted$", out, re.MULTILINE)
    assert "audit log     partitions until 20" in out
    assert settings.vault_token.get_secret_value() not in out


def test_status_of_an_unmigrated_database_is_unhealthy(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", settings.database_url.get_secret_value())
    assert cli.main(["status"]) == cli.EXIT_UNHEALTHY
    assert "revision none" in capsys.readouterr().out


def test_migrate_sql_prints_offline_sql_without_a_database(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TENANTVAULT_DATABASE_URL", raising=False)
    assert cli.main(["migrate", "--sql"]) == cli.EXIT_OK
    sql = capsys.readouterr().out
    assert "CREATE TABLE dripiq_app.email_provider_configs" in sql
    assert "FORCE ROW LEVEL SECURITY" in sql
    assert 'INSERT INTO "dripiq_app"."email_provider_configs"' in sql


def test_a_refused_downgrade_is_one_failed_line_and_exit_1(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlalchemy as sa

    from tenantvault.ops import migrate

    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", settings.database_url.get_secret_value())
    migrate.upgrade(settings)
    with migrate.migration_engine(settings).begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO dripiq_app.tenants (id, name) VALUES ('t1', 'T');"
                "INSERT INTO dripiq_app.email_provider_configs (tenant_id, type, name, config) "
                "VALUES ('t1', 'smtp', 'Relay', '{}')"
            )
        )
    assert cli.main(["migrate", "--downgrade", "--revision", "base"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(
        "FAILED: tenantvault: downgrade refused: it would delete email provider configs"
    )


def test_a_bad_setting_fails_with_its_name_and_not_its_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", "mysql://u:hunter2@h/db")
    assert cli.main(["status"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "FAILED: invalid settings: TENANTVAULT_DATABASE_URL" in err
    assert "hunter2" not in err


def test_status_is_unhealthy_when_audit_partitions_run_out(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlalchemy as sa

    from tenantvault.ops import migrate

    migrate.upgrade(settings)
    with migrate.migration_engine(settings).begin() as connection:
        for (name,) in connection.execute(
            sa.text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'dripiq_app.audit_events'::regclass ORDER BY 1 OFFSET 1"
            )
        ).all():
            connection.exec_driver_sql(f"DROP TABLE dripiq_app.{name}")
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", settings.database_url.get_secret_value())
    assert settings.vault_addr is not None
    assert settings.vault_token is not None
    monkeypatch.setenv("VAULT_ADDR", str(settings.vault_addr))
    monkeypatch.setenv("VAULT_TOKEN", settings.vault_token.get_secret_value())
    assert cli.main(["status"]) == cli.EXIT_UNHEALTHY
    assert "run `tenantvault audit partitions`" in capsys.readouterr().out
    assert cli.main(["audit", "partitions"]) == cli.EXIT_OK
    assert "24 new monthly partitions" in capsys.readouterr().out
    assert cli.main(["status"]) == cli.EXIT_OK
