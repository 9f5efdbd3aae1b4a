"""The operator command: thin over the library, one FAILED: line on errors, no secrets."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import cli
from tenantvault.db.models import TENANTVAULT_TABLES
from tenantvault.settings import Settings
from tests.support import REVISIONS

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}


def test_migrate_then_status_reports_an_isolated_up_to_date_schema(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", settings.database_url.get_secret_value())
    assert settings.vault_addr is not None
    assert settings.vault_token is not None
    monkeypatch.setenv("VAULT_ADDR", str(settings.vault_addr))
    monkeypatch.setenv("VAULT_TOKEN", settings.vault_token.get_secret_value())
    assert cli.main(["migrate"]) == cli.EXIT_OK
    assert f"none -> {REVISIONS[-1]}" in capsys.readouterr().out
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
    assert cli.main(["migrate", "--downgrade", "--revision", "0001"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0] == (
        "FAILED: downgrade to 0001 refused, nothing was changed: it would delete "
        "1 email provider configs [0002_provider_tables]. Back them up, then rerun with "
        "--allow-data-loss"
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


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert cli.main(["--version"]) == cli.EXIT_OK
    assert capsys.readouterr().out == f"tenantvault {version('tenantvault')}\n"
    # Also when argparse answers it (before a command's name).
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version", "status"])
    assert exited.value.code == cli.EXIT_OK
    assert capsys.readouterr().out == f"tenantvault {version('tenantvault')}\n"


def _parsers(
    parser: argparse.ArgumentParser, path: str = "tenantvault"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_subcommand_and_option_says_what_it_does() -> None:
    from tenantvault.cli.commands import build_parser

    undocumented = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                undocumented += [f"{path} {n}" for n in action.choices if not helps.get(n)]
            elif not action.help:
                undocumented.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert undocumented == []


def test_the_readme_lists_every_option_of_every_command() -> None:
    from pathlib import Path

    from tenantvault.cli.commands import build_parser

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listing = readme.split("## Operator command", 1)[1].split("```", 2)[1]
    missing = []
    for path, parser in _parsers(build_parser()):
        if path == "tenantvault":
            continue
        lines = [line for line in listing.splitlines() if line.startswith(path + " ")]
        for action in parser._actions:
            for option in action.option_strings:
                if option not in {"-h", "--help"} and not any(option in line for line in lines):
                    missing.append(f"{path} {option}")
    assert missing == []


def _environment(monkeypatch: pytest.MonkeyPatch, settings: Settings, token: str) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", settings.database_url.get_secret_value())
    assert settings.vault_addr is not None
    monkeypatch.setenv("VAULT_ADDR", str(settings.vault_addr))
    monkeypatch.setenv("VAULT_TOKEN", token)
    monkeypatch.setenv("TENANTVAULT_TRANSIT_KEY", "tenantvault-tests")


def test_status_names_a_refused_token_and_aligns_its_table(
    migrated: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _environment(monkeypatch, migrated, "not-a-valid-token")
    assert cli.main(["status"]) == cli.EXIT_UNHEALTHY
    out = capsys.readouterr().out
    assert re.search(r"^transit +http\S+: the token was refused \(not a valid token: ", out, re.M)
    assert "not-a-valid-token" not in out
    columns = {line.index(" RLS ") for line in out.splitlines() if " RLS " in line}
    assert len(columns) == 1, out


def test_status_is_unhealthy_when_data_keys_name_kek_versions_transit_lacks(
    vault: Any,
    migrated: Settings,
    owner_engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import sqlalchemy as sa

    assert migrated.vault_token is not None
    _environment(monkeypatch, migrated, migrated.vault_token.get_secret_value())
    vault.create_config("t_a", type="smtp", name="R", config=SMTP, credentials={"password": "p"})
    assert cli.main(["status"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert re.search(
        r"^data keys +wrapped under KEK v\d+\.\.v\d+; the transit key unwraps", out, re.M
    )

    # As after a dev server that forgot its keys: the transit key the data keys name
    # (and the deployment's) is missing.
    monkeypatch.setenv("TENANTVAULT_TRANSIT_KEY", "tenantvault-never-created")
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.tenant_data_keys "
                "SET kek_ref = 'transit:tenantvault-never-created'"
            )
        )
    assert cli.main(["status"]) == cli.EXIT_UNHEALTHY
    out = capsys.readouterr().out
    assert "data keys     CANNOT BE UNWRAPPED: data keys are wrapped under KEK v" in out
    assert "missing: no transit key transit/tenantvault-never-created" in out

    # As after a restore of the database with an older transit key: a version it lacks.
    monkeypatch.setenv("TENANTVAULT_TRANSIT_KEY", "tenantvault-tests")
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.tenant_data_keys SET kek_version = 99, "
                "kek_ref = 'transit:tenantvault-tests', "
                "wrapped_key = regexp_replace(wrapped_key, '^vault:v\\d+:', 'vault:v99:')"
            )
        )
    assert cli.main(["status"]) == cli.EXIT_UNHEALTHY
    assert "CANNOT BE UNWRAPPED: data keys name KEK v99; the transit key has versions only" in (
        capsys.readouterr().out
    )


def test_status_is_unhealthy_when_transit_cannot_show_the_data_keys_unwrap(
    vault: Any,
    migrated: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import hvac

    assert migrated.vault_token is not None
    assert migrated.vault_addr is not None
    root_token = migrated.vault_token.get_secret_value()
    vault.create_config("t_a", type="smtp", name="R", config=SMTP, credentials={"password": "p"})

    # No transit engine where the settings point: the data keys cannot be unwrapped.
    _environment(monkeypatch, migrated, root_token)
    monkeypatch.setenv("TENANTVAULT_TRANSIT_MOUNT", "transit-not-mounted")
    assert cli.main(["status"]) == cli.EXIT_UNHEALTHY
    out = capsys.readouterr().out
    assert "CANNOT BE UNWRAPPED" in out
    assert "missing: no transit engine mounted at transit-not-mounted/" in out

    # A token that may list the engines but not read the key: not shown to unwrap.
    root = hvac.Client(url=str(migrated.vault_addr), token=root_token)
    root.sys.create_or_update_policy(
        name="status-without-key-read", policy='path "sys/mounts" { capabilities = ["read"] }'
    )
    token = root.auth.token.create(policies=["status-without-key-read"], ttl="10m")
    _environment(monkeypatch, migrated, token["auth"]["client_token"])
    monkeypatch.delenv("TENANTVAULT_TRANSIT_MOUNT")
    assert cli.main(["status"]) == cli.EXIT_UNHEALTHY
    assert "not checked: the token may not read transit/tenantvault-tests" in (
        capsys.readouterr().out
    )
