"""What the ``tenantvault`` command knows without importing the library (SQLAlchemy,
hvac, pydantic): its exit codes and its version, so that ``--version`` answers at once."""

from __future__ import annotations

import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNHEALTHY = 3
EXIT_INCOMPLETE = 4
EXIT_AUDIT_BROKEN = 5
EXIT_INTERRUPTED = 130


def installed_version() -> str:
    """tenantvault's version as installed (a source tree on sys.path is not installed)."""
    try:
        return metadata.version("tenantvault")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def print_version() -> None:
    """``tenantvault --version``'s line, printed here rather than by ``cli/output``,
    which imports the reports it prints (and the library with them)."""
    print(f"tenantvault {installed_version()}")


def _as_typed(path: Path) -> str:
    """``path`` as the user would type it here: relative when under the current
    directory (``.venv/bin/tenantvault``), else absolute."""
    absolute = path.absolute()
    try:
        relative = str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)
    return relative if "/" in relative else f"./{relative}"  # a bare name searches PATH


def typed_command() -> str:
    """How to type this command again, for the hints it prints: ``tenantvault`` when
    that name on PATH is this very script; else the running console script's path
    (``.venv/bin/tenantvault``: a venv not activated), or ``python -m tenantvault.cli``
    with this interpreter."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is None or script.name != "tenantvault" or not script.is_file():
        return f"{_as_typed(Path(sys.executable))} -m tenantvault.cli"
    on_path = shutil.which("tenantvault")
    if on_path is not None and os.path.realpath(on_path) == os.path.realpath(script):
        return "tenantvault"
    return _as_typed(script)
