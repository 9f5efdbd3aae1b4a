"""Every command, given each kind of bad input, fails with one FAILED: line and a
documented exit code: no traceback, no password, no sealed value."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest
import sqlalchemy as sa

from tenantvault import cli
from tenantvault.cli import failures
from tenantvault.settings import Settings
from tests.conftest import Services

PASSWORD = "pw-Zq81-not-for-output"

# Each command that reaches the database, with the arguments it needs.
DATABASE_COMMANDS = [
    ["status"],
    ["migrate"],
    ["migrate", "--adopt"],
    ["migrate", "--downgrade", "--revision", "base"],
    ["audit", "verify"],
    ["audit", "prune", "--keep-months", "3", "--dry-run"],
    ["audit", "partitions"],
    ["purge", "--older-than-days", "30", "--dry-run"],
    ["rotate-keys", "status"],
    ["rotate-keys", "dek", "--all", "--dry-run"],
    ["rotate-keys", "kek", "--dry-run"],
    ["shred", "--tenant", "t_a", "--dry-run"],
    ["grants", "--app-login", "app_login"],
    ["demo"],
]


def _bad_urls(services: Services) -> dict[str, str]:
    """A URL per way of naming the database wrongly; each carries a password."""
    server = sa.engine.make_url(services.admin_url)
    host, port = server.host or "127.0.0.1", server.port or 5432
    closed = _closed_port()
    return {
        "refused port": f"postgresql://postgres:{PASSWORD}@127.0.0.1:{closed}/x",
        "wrong database": f"postgresql://postgres:{PASSWORD}@{host}:{port}/no_such_db_tv",
        "unknown role": f"postgresql://no_such_role_tv:{PASSWORD}@{host}:{port}/postgres",
        "unresolvable host": f"postgresql://u:{PASSWORD}@no-such-host.invalid:5432/x",
    }


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again when the block ends


def _one_failed_line(out: str, err: str) -> str:
    assert "Traceback" not in out + err
    assert PASSWORD not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("FAILED: "), err
    return lines[0]


@pytest.mark.parametrize(
    "kind", ["refused port", "wrong database", "unknown role", "unresolvable host"]
)
def test_a_bad_database_url_is_one_line_for_every_command(
    kind: str,
    services: Services,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", _bad_urls(services)[kind])
    monkeypatch.setenv("VAULT_ADDR", services.vault_addr)
    monkeypatch.setenv("VAULT_TOKEN", services.vault_token)
    monkeypatch.setenv("TENANTVAULT_CONNECT_TIMEOUT_SECONDS", "3")
    expected = {
        "refused port": "refused",
        "wrong database": 'database "no_such_db_tv" does not exist',
        "unknown role": "no_such_role_tv",
        "unresolvable host": "no-such-host.invalid",
    }[kind]
    for command in DATABASE_COMMANDS:
        code = cli.main(command)
        captured = capsys.readouterr()
        line = _one_failed_line(captured.out, captured.err)
        assert code == cli.EXIT_FAILED, (command, line)
        assert line.startswith("FAILED: cannot connect to the database: "), (command, line)
        assert expected in line, (command, line)


def test_a_bad_database_url_in_a_real_process_prints_no_traceback(services: Services) -> None:
    url = _bad_urls(services)["wrong database"]
    environment = {"TENANTVAULT_DATABASE_URL": url, "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "tenantvault.cli", "audit", "verify"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )
    assert result.returncode == cli.EXIT_FAILED
    line = _one_failed_line(result.stdout, result.stderr)
    assert 'database "no_such_db_tv" does not exist' in line


def test_an_unknown_revision_is_one_line_and_changes_nothing(
    settings: Settings,
    owner_engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", settings.database_url.get_secret_value())
    for command in (
        ["migrate", "--revision", "bogus"],
        ["migrate", "--adopt", "--revision", "bogus"],
        ["migrate", "--downgrade", "--revision", "bogus"],
        ["migrate", "--sql", "--revision", "bogus"],
        ["migrate", "--revision", "-3"],
    ):
        assert cli.main(command) == cli.EXIT_USAGE, command
        captured = capsys.readouterr()
        line = _one_failed_line(captured.out, captured.err)
        assert "revision" in line, line
    with owner_engine.connect() as connection:
        tables = sa.inspect(connection).get_table_names(schema="dripiq_app")
    assert tables == []  # not even alembic_version: nothing ran


def test_a_driver_error_is_reduced_to_the_servers_primary_message(
    owner_engine: sa.Engine,
) -> None:
    """A CHECK violation's DETAIL quotes the failing row (here a sealed-looking value);
    SQLAlchemy's text adds the statement. The FAILED line carries neither."""
    sealed = "tv2:1:sealed-value-that-must-not-be-printed"
    with owner_engine.begin() as connection:
        connection.execute(sa.text("CREATE SCHEMA scratch"))
        connection.execute(sa.text("CREATE TABLE scratch.failing (v text CHECK (v = 'ok'))"))
    with pytest.raises(sa.exc.IntegrityError) as raised, owner_engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO scratch.failing VALUES (:v)"), {"v": sealed})
    assert sealed in str(raised.value.orig)  # the driver's own text does quote it
    line = failures.describe(raised.value)
    assert (
        line
        == 'the database refused: new row for relation "failing" violates check constraint "failing_v_check"'
    )
    url = owner_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as raw, pytest.raises(psycopg.DataError) as nul:
        raw.execute("SELECT %s::text", (f"{sealed}\x00",))
    assert sealed not in failures.describe(nul.value)


def test_an_unexpected_error_is_named_by_its_type_only() -> None:
    line = failures.describe(RuntimeError(f"a message that may hold {PASSWORD}"))
    assert line == "unexpected RuntimeError: a bug in tenantvault; please report it"
