"""What a wheel carries beside the code, and what the command costs before any work:
the license text ships, the changelog states the version policy, ``--version`` answers
without importing the library."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"sqlalchemy", "hvac", "pydantic", "alembic", "psycopg", "cryptography", "requests"}


def test_version_answers_before_the_library_is_imported() -> None:
    # As the console script runs it: import the entry point, call it.
    program = (
        "import sys\n"
        "from tenantvault.cli import main\n"
        "code = main(['--version'])\n"
        "print(code, sorted({m.split('.')[0] for m in sys.modules}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=True,
    )
    version_line, modules_line = result.stdout.splitlines()
    assert version_line.startswith("tenantvault ")
    code, modules = modules_line.split(" ", 1)
    assert code == "0"
    assert {name for name in HEAVY if f"'{name}'" in modules} == set()


def test_the_apache_license_text_is_shipped() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert pyproject["project"]["license-files"] == ["LICENSE"]
    # hatchling reads license-files (PEP 639) from 1.27 on.
    assert pyproject["build-system"]["requires"] == ["hatchling>=1.27"]


def test_the_changelog_states_the_version_policy_and_what_is_unreleased() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    policy = changelog.split("## Version policy", 1)[1].split("\n## ", 1)[0]
    for term in ("minor", "major", "deprecat", "patch"):
        assert term in policy.lower(), term
    unreleased = changelog.split("## Unreleased", 1)[1].split("\n## ", 1)[0]
    assert unreleased.count("\n- ") >= 5
