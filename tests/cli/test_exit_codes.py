"""The exit codes README.md states, through a real ``tenantvault`` process: a bad argument
is a usage error (2) in one ``FAILED:`` line naming the option and what it accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tenantvault import cli
from tenantvault.rotation.options import MAX_BATCH_SIZE, MAX_WORKERS
from tenantvault.settings import Settings
from tests.cli.process import failed_line, run_cli
from tests.conftest import Services


@pytest.mark.parametrize("job", [["kek"], ["dek", "--all"]])
@pytest.mark.parametrize("size", ["0", str(MAX_BATCH_SIZE + 1)])
def test_an_out_of_range_batch_size_is_a_usage_error_naming_its_range(
    job: list[str], size: str
) -> None:
    line = failed_line(run_cli("rotate-keys", *job, "--batch-size", size), cli.EXIT_USAGE)
    assert f"--batch-size: must be 1..{MAX_BATCH_SIZE}, not {size}" in line
    assert "bug" not in line


@pytest.mark.parametrize("job", [["kek"], ["dek", "--all"]])
def test_help_shows_the_ranges_of_batch_size_and_workers(job: list[str]) -> None:
    result = run_cli("rotate-keys", *job, "--help")
    assert result.returncode == cli.EXIT_OK
    text = " ".join(result.stdout.split())
    assert f"(1..{MAX_BATCH_SIZE}; default: 1000)" in text
    assert f"(1..{MAX_WORKERS}; default: 1)" in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [("abc", f"'abc' is not a whole number (1..{MAX_WORKERS})"), ("17", "must be 1..16, not 17")],
)
def test_workers_out_of_range_names_its_maximum_and_no_internal_function(
    value: str, expected: str
) -> None:
    line = failed_line(run_cli("rotate-keys", "dek", "--all", "--workers", value), cli.EXIT_USAGE)
    assert f"argument --workers: {expected}" in line
    assert "_positive" not in line
    assert "value:" not in line  # argparse's "invalid <function name> value:"


def test_a_usage_error_of_argparse_is_one_failed_line_too() -> None:
    line = failed_line(run_cli("rotate-keys", "dek"), cli.EXIT_USAGE)
    assert "one of the arguments --tenant --all is required" in line
    assert "`tenantvault rotate-keys dek --help`" in line


@pytest.mark.parametrize("flags", [["--yes"], ["--dry-run"]])
def test_shred_of_an_unknown_tenant_is_a_usage_error_not_nothing_destroyed(
    flags: list[str], migrated: Settings, services: Services
) -> None:
    result = run_cli(
        "shred",
        "--tenant",
        "t_nobody",
        *flags,
        TENANTVAULT_DATABASE_URL=migrated.database_url.get_secret_value(),
        VAULT_ADDR=services.vault_addr,
        VAULT_TOKEN=services.vault_token,
    )
    line = failed_line(result, cli.EXIT_USAGE)
    assert line == "FAILED: --tenant: no such tenant in dripiq_app.tenants: t_nobody"
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--sql", "--revision", "bogus"], "--revision bogus: no such revision"),
        (["--sql", "--downgrade", "--from", "bogus", "--revision", "0002"], "--from bogus:"),
        (["--sql", "--revision", "-3"], "--revision: Relative revision -3"),
    ],
)
def test_an_unknown_revision_is_a_usage_error_naming_its_flag(args: list[str], named: str) -> None:
    line = failed_line(run_cli("migrate", *args), cli.EXIT_USAGE)
    assert named in line


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("no-such-dir/heads.json", "cannot write {path}: {parent} does not exist"),
        (".", "{path} is a directory"),
    ],
)
def test_heads_out_is_checked_before_verifying_and_named(
    where: str, expected: str, tmp_path: Path
) -> None:
    path = tmp_path / where
    # The database is unreachable: a verify that ran first would fail on it (exit 1).
    line = failed_line(run_cli("audit", "verify", "--heads-out", str(path)), cli.EXIT_USAGE)
    assert line == "FAILED: --heads-out: " + expected.format(path=path, parent=path.parent)


def test_expect_heads_that_does_not_exist_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    for job in (["verify"], ["prune", "--keep-months", "3", "--dry-run"]):
        line = failed_line(run_cli("audit", *job, "--expect-heads", str(missing)), cli.EXIT_USAGE)
        assert line == f"FAILED: --expect-heads: {missing} does not exist"
