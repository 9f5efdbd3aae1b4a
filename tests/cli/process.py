"""The ``tenantvault`` command as an operator runs it: a real process, its one
``FAILED:`` line and its exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import PGBOUNCER_SETTINGS

SRC = Path(__file__).resolve().parents[2] / "src"
# The database a command gets unless given another: nothing answers there, so an
# argument that is not refused before the command starts fails otherwise (exit 1).
NO_DATABASE = "postgresql://nobody:pw@127.0.0.1:1/none"


def run_cli(*args: str, **environment: str) -> subprocess.CompletedProcess[str]:
    """``python -m tenantvault.cli`` from this checkout, with only the settings given."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(SRC),
        "TENANTVAULT_DATABASE_URL": NO_DATABASE,
        "TENANTVAULT_CONNECT_TIMEOUT_SECONDS": "3",
        # The PgBouncer lane's settings (tests/conftest.py), where it runs.
        **{name: value for name, value in os.environ.items() if name in PGBOUNCER_SETTINGS},
        **environment,
    }
    return subprocess.run(
        [sys.executable, "-m", "tenantvault.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def failed_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The one ``FAILED:`` line a failed run printed, checking its exit code."""
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("FAILED: "), result.stderr
    assert result.returncode == code, (result.returncode, lines[0])
    return lines[0]
