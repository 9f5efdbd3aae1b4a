"""The package is typed: it ships py.typed, so a caller's mypy --strict sees its types."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path


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
