"""What the ``tenantvault`` command knows without importing the library (SQLAlchemy,
hvac, pydantic): its exit codes and its version, so that ``--version`` answers at once."""

from __future__ import annotations

from importlib import metadata

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
