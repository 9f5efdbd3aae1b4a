"""The package is typed: it ships py.typed, so a caller's mypy --strict sees its types."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import tenantvault
from tests.test_readme import python_blocks


def test_the_package_ships_the_typed_marker() -> None:
    assert resources.files("tenantvault").joinpath("py.typed").is_file()


def test_a_strict_caller_sees_types_not_any(tmp_path: Path) -> None:
    caller = tmp_path / "caller.py"
    caller.write_text(
        "from tenantvault import Vault\n"
        "from tenantvault.vault.providers import CredentialsModel\n\n"
        "def load(vault: Vault) -> CredentialsModel:\n"
        "    return vault.load_credentials('t', 'c')\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(caller)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "py.typed" not in done.stdout


# Calls through both facades; a line ending in "# wrong" must be refused (so the
# signatures mypy sees are the real ones, not ``...``), every other line accepted.
CALLER = """\
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from tenantvault import (
    AsyncVault,
    OAuthToken,
    ProviderConfig,
    RefreshedToken,
    SendGridCredentials,
    SmtpConfig,
    SmtpCredentials,
    Vault,
)


def typed(vault: Vault) -> SmtpCredentials:
    opened = vault.open_config("t", "c")
    port: int = opened.config_as(SmtpConfig).port
    opened.config_as(SmtpCredentials)  # wrong
    key: SendGridCredentials = opened.credentials_as(SmtpCredentials)  # wrong
    opened.credentials.password  # wrong
    return opened.credentials_as(SmtpCredentials)


def sync(vault: Vault, session: Session) -> ProviderConfig:
    vault.store_oauth_token("t", "c", access_token="a", scopes=["s"], session=session)
    vault.get_config("t", "c", session=AsyncSession())  # wrong
    vault.get_config("t", "c", with_credential=True)  # wrong
    number: int = vault.get_config("t", "c")  # wrong
    return vault.get_config("t", "c", with_credentials=True, session=session)


async def asynchronous(vault: AsyncVault, session: AsyncSession) -> ProviderConfig:
    async def refresher(token: OAuthToken) -> RefreshedToken:
        return RefreshedToken("a", None)

    await vault.refresh_oauth_token("t", "c", refresher)
    await vault.load_credentials("t", "c", session=session)
    await vault.get_config("t", "c", session=Session())  # wrong
    await vault.store_oauth_token("t", "c", session=session)  # wrong
    vault.delete_config("t", "c")  # wrong
    secret: SmtpCredentials = (await vault.open_config("t", "c")).credentials_as(SmtpCredentials)
    (await vault.open_config("t", "c")).config_as(SmtpConfig).api_key  # wrong
    return await vault.get_config("t", "c", with_credentials=True, session=session)
"""


def _strict_mypy(tmp_path: Path, *callers: Path) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` on ``callers`` against the package under test (the one this
    process imported), not whichever the interpreter has installed; errors inside it
    are not the callers'."""
    under_test = Path(tenantvault.__file__).parents[1]
    mypy = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--follow-imports=silent"]
    done = subprocess.run(
        [*mypy, *map(str, callers)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "MYPYPATH": str(under_test)},
    )
    assert "Found" in done.stdout or "Success" in done.stdout, done.stdout + done.stderr
    return done


def test_mypy_sees_each_facade_method_s_own_signature(tmp_path: Path) -> None:
    caller = tmp_path / "caller.py"
    caller.write_text(CALLER)
    done = _strict_mypy(tmp_path, caller)
    refused = {int(line.split(":")[1]) for line in done.stdout.splitlines() if ": error:" in line}
    wrong = {n for n, line in enumerate(CALLER.splitlines(), 1) if line.endswith("# wrong")}
    assert refused == wrong, done.stdout + done.stderr


def test_readme_python_passes_mypy_strict_without_a_cast(tmp_path: Path) -> None:
    """README's code type-checks as an application's would: each ```python block (the
    blocks tests/test_readme.py runs) a module of its own under ``mypy --strict``, its
    lines where README.md has them, and none casts or silences the checker."""
    blocks = python_blocks()
    callers = []
    for number, block in enumerate(blocks):
        assert "cast(" not in block.code, block.line
        assert "type: ignore" not in block.code, block.line
        caller = tmp_path / f"readme_block_{number}.py"
        caller.write_text("\n" * (block.line - 1) + block.code)  # errors name README's lines
        callers.append(caller)
    done = _strict_mypy(tmp_path, *callers)
    assert done.returncode == 0, done.stdout + done.stderr
