"""The rotate-keys and shred commands: thin over the library, plain or JSON lines when
not on a terminal, documented exit codes, no secrets in their output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import Vault, cli
from tenantvault.settings import Settings
from tests.conftest import Services, transit_provider
from tests.rotation_support import key_states, open_everything, populate


@pytest.fixture
def operator_env(
    migrated: Settings, services: Services, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    environment = {
        "TENANTVAULT_DATABASE_URL": migrated.database_url.get_secret_value(),
        "VAULT_ADDR": services.vault_addr,
        "VAULT_TOKEN": services.vault_token,
        "TENANTVAULT_TRANSIT_KEY": "tenantvault-tests",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return environment


def test_dek_rotation_of_all_tenants_prints_a_line_per_tenant_and_a_summary(
    vault: Vault, operator_env: object, capsys: pytest.CaptureFixture[str], owner_engine: sa.Engine
) -> None:
    expected = populate(vault, "t_a")
    assert cli.main(["rotate-keys", "dek", "--all", "--batch-size", "2"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "tenant t_a: rotated v1 -> v2" in out
    assert "summary: 1 tenants (1 rotated); re-sealed" in out
    assert all(secret not in out for secret in expected.values())
    assert key_states(owner_engine, "t_a") == {1: "retired", 2: "active"}


def test_dry_run_and_status_change_nothing_and_json_lines_parse(
    vault: Vault, operator_env: object, capsys: pytest.CaptureFixture[str], owner_engine: sa.Engine
) -> None:
    populate(vault, "t_a")
    assert cli.main(["rotate-keys", "dek", "--tenant", "t_a", "--dry-run", "--json"]) == cli.EXIT_OK
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["tenant", "summary"]
    assert events[0]["outcome"] == "would rotate"
    assert events[1]["resealed"] == sum(events[0]["resealed"].values()) > 0
    assert cli.main(["rotate-keys", "kek", "--dry-run"]) == cli.EXIT_OK
    assert "kek: would rotate" in capsys.readouterr().out
    assert cli.main(["rotate-keys", "status", "--json"]) == cli.EXIT_OK
    status = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status[0]["tenant_id"] == "t_a"
    assert [k["state"] for k in status[0]["keys"]] == ["active"]
    assert key_states(owner_engine, "t_a") == {1: "active"}


def test_kek_rotation_with_workers_rewraps_every_key_and_reports_in_json(
    app_settings: Settings,
    services: Services,
    operator_env: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A transit key of its own: rotating the shared one would move every other test's.
    name = f"cli-kek-{uuid.uuid4().hex[:8]}"
    provider = transit_provider(services, key_name=name)
    vault = Vault.from_settings(app_settings, key_provider=provider)
    try:
        expected = {t: populate(vault, t) for t in ("t_a", "t_b")}
        monkeypatch.setenv("TENANTVAULT_TRANSIT_KEY", name)
        argv = ["rotate-keys", "kek", "--workers", "2", "--batch-size", "1", "--json"]
        assert cli.main(argv) == cli.EXIT_OK
        summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()][-1]
        assert (summary["ok"], summary["rotated"], summary["kek_after"]) == (True, True, 2)
        assert (summary["rewrapped"], summary["behind"]) == (2, 0)
        vault.keyring.cache.clear()
        assert {t: open_everything(vault, t) for t in expected} == expected
    finally:
        vault.dispose()


def test_a_value_that_will_not_open_exits_4_naming_its_place(
    vault: Vault, operator_env: object, capsys: pytest.CaptureFixture[str], owner_engine: sa.Engine
) -> None:
    populate(vault, "t_a")
    with owner_engine.begin() as connection:
        row = connection.execute(
            sa.text(
                "UPDATE dripiq_app.email_provider_tokens SET encrypted_access_token = encrypted_refresh_token "
                "RETURNING config_id"
            )
        ).scalar_one()
    assert cli.main(["rotate-keys", "dek", "--all"]) == cli.EXIT_INCOMPLETE
    out = capsys.readouterr().out
    assert (
        f"could not open: tenant t_a email_provider_tokens.encrypted_access_token row {row} "
        "(DecryptionError)" in out
    )


def test_shred_needs_yes_and_then_destroys_the_keys(
    vault: Vault, operator_env: object, capsys: pytest.CaptureFixture[str], owner_engine: sa.Engine
) -> None:
    populate(vault, "t_a")
    assert cli.main(["shred", "--tenant", "t_a"]) == cli.EXIT_USAGE
    assert "Rerun with --yes" in capsys.readouterr().err
    assert key_states(owner_engine, "t_a") == {1: "active"}
    assert cli.main(["shred", "--tenant", "t_a", "--yes"]) == cli.EXIT_OK
    assert "tenant t_a: destroyed v1;" in capsys.readouterr().out
    assert key_states(owner_engine, "t_a") == {1: "destroyed"}


def test_neither_tenant_nor_all_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["rotate-keys", "dek"])
    assert exited.value.code == cli.EXIT_USAGE


def test_a_malformed_tenant_id_is_refused_before_anything_runs(
    operator_env: object, capsys: pytest.CaptureFixture[str], owner_engine: sa.Engine
) -> None:
    assert (
        cli.main(["rotate-keys", "dek", "--tenant", "t_a", "--tenant", "bad id;"]) == cli.EXIT_USAGE
    )
    assert "FAILED: tenant_id must be 1-128 characters" in capsys.readouterr().err
    with owner_engine.connect() as connection:
        assert (
            connection.execute(sa.text("SELECT count(*) FROM dripiq_app.audit_events")).scalar_one()
            == 0
        )


def test_the_application_login_is_refused_with_a_clear_failed_line(
    vault: Vault,
    app_url: str,
    operator_env: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", app_url)
    assert cli.main(["rotate-keys", "dek", "--all"]) == cli.EXIT_FAILED
    assert "FAILED: this login may not SET ROLE tenantvault_migrator" in capsys.readouterr().err


def test_ctrl_c_stops_after_the_current_batch_and_exits_130(
    vault: Vault, operator_env: dict[str, str], owner_engine: sa.Engine
) -> None:
    for n in range(30):
        vault.create_config(
            "t_a", type="smtp", name=f"c{n}", config=SMTP, credentials={"password": f"p{n}"}
        )
    # A child that sends itself one SIGINT after its first committed batch, as Ctrl-C
    # would, and gives the main thread a moment to take it before the next batch.
    child = (
        "import os, signal, sys, time\n"
        "from tenantvault import cli\n"
        "from tenantvault.rotation import dek as dekrotation\n"
        "real = dekrotation.DekRotation._progress\n"
        "sent = []\n"
        "def progress(self, event):\n"
        "    real(self, event)\n"
        "    if event.column and not sent:\n"
        "        sent.append(1)\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.5)\n"
        "dekrotation.DekRotation._progress = progress\n"
        "sys.exit(cli.main(['rotate-keys', 'dek', '--all', '--batch-size', '5']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child],
        env={**os.environ, **operator_env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == cli.EXIT_INTERRUPTED, done.stderr
    assert "stopping after the current batch" in done.stderr
    assert "stopped: interrupted" in done.stdout
    states: Any = key_states(owner_engine, "t_a")
    assert states == {1: "draining", 2: "active"}
    with owner_engine.connect() as connection:
        moved = connection.execute(
            sa.text(
                "SELECT count(*) FROM dripiq_app.email_provider_configs WHERE encrypted_credentials LIKE 'tv3.2.%'"
            )
        ).scalar_one()
    assert moved == 5  # exactly the one batch


SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}


@pytest.mark.parametrize(
    "command",
    [
        ["audit", "verify", "--tenant", "t_a", "--tenant", "t_nobody"],
        ["rotate-keys", "status", "--tenant", "t_nobody"],
        ["rotate-keys", "dek", "--tenant", "t_nobody"],
    ],
)
def test_an_unknown_tenant_is_a_usage_error_not_nothing_to_do(
    command: list[str],
    vault: Vault,
    operator_env: object,
    capsys: pytest.CaptureFixture[str],
    owner_engine: sa.Engine,
) -> None:
    populate(vault, "t_a")
    assert cli.main(command) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("FAILED: --tenant: no such tenant in dripiq_app.tenants: t_nobody\n")
    assert key_states(owner_engine, "t_a") == {1: "active"}


def test_a_dry_run_with_vault_down_does_not_claim_it_tried_to_open_values(
    vault: Vault,
    operator_env: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    populate(vault, "t_a")
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:1")
    assert cli.main(["rotate-keys", "dek", "--all", "--dry-run"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "would re-seal" in out
    assert "could not be opened" not in out
    assert "a dry run opens nothing" in out
    assert cli.main(["rotate-keys", "dek", "--all", "--dry-run", "--json"]) == cli.EXIT_OK
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["unopenable"] is None


def test_vault_down_is_said_in_plain_words(
    operator_env: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:1")
    monkeypatch.setenv("TENANTVAULT_VAULT_TIMEOUT_SECONDS", "1")
    assert cli.main(["rotate-keys", "status"]) == cli.EXIT_FAILED
    assert capsys.readouterr().err == (
        "FAILED: could not read the transit key: transit at http://127.0.0.1:1 is unreachable "
        "(no connection)\n"
    )
