"""The ``tenantvault`` command."""

from tenantvault.cli.commands import (
    EXIT_AUDIT_BROKEN,
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNHEALTHY,
    EXIT_USAGE,
    main,
)

__all__ = [
    "EXIT_AUDIT_BROKEN",
    "EXIT_FAILED",
    "EXIT_INCOMPLETE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNHEALTHY",
    "EXIT_USAGE",
    "main",
]
