"""The scripts a newcomer runs first say what they are doing: ``scripts/_venv.sh`` (which
``scripts/demo`` and ``scripts/test`` source) prints a line per phase while it makes the
venv, and nothing once the venv is up to date. Run as a real ``bash`` on a copy of the
script, with an interpreter that records what it is asked to run instead of installing
(the tests install nothing)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Stands in for python3: answers the version check with this interpreter, and makes a
# ".venv/bin/python" that records its arguments (pip's) instead of running them.
PYTHON = f"""#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/usr/bin/env bash\\necho "$*" >>"$(dirname "$0")/../calls"\\n' >"$3/bin/python"
  chmod +x "$3/bin/python"
  exit 0
fi
exec {sys.executable} "$@"
"""


def checkout(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "_venv.sh", tmp_path / "scripts" / "_venv.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    python = tmp_path / "python3"
    python.write_text(PYTHON)
    python.chmod(0o755)
    return tmp_path


def source_venv(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", 'source scripts/_venv.sh && echo "sourced in $PWD"'],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(root / "python3")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_first_run_says_what_it_installs_a_line_per_phase(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    first = source_venv(root)
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"sourced in {root}\n"  # stdout stays the caller's
    lines = first.stderr.splitlines()
    assert lines[0] == f"creating .venv (with {root / 'python3'})"
    assert lines[1] == "updating pip in .venv"
    assert lines[2].startswith("installing tenantvault and its dev stack")
    assert lines[2].endswith("into .venv (first run: about a minute)...")
    assert lines[3].startswith("installed into .venv in ")
    assert len(lines) == 4
    calls = (root / ".venv" / "calls").read_text().splitlines()
    assert [call.split()[-1] for call in calls] == ["pip", ".[dev,test]"]

    again = source_venv(root)  # up to date: nothing to say, nothing installed
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""
    assert len((root / ".venv" / "calls").read_text().splitlines()) == 2
