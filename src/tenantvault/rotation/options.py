"""How a rotation runs: one frozen options object each, built by the CLI (or a
scheduler), passed unchanged through ``tenantvault.ops`` into the rotation."""

from __future__ import annotations

from dataclasses import dataclass

from tenantvault.errors import InvalidInputError

MAX_BATCH_SIZE = 50_000
# Each worker holds database connections and a transit request at a time, beside the
# application's own (PostgreSQL's default max_connections is 100). The measured gain
# flattens after two workers on a 2-core database (docs/rotation.md); 16 leaves room
# for a larger one while a mistyped 100 cannot take the server's connections.
MAX_WORKERS = 16


def _check(workers: int, batch_size: int) -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise InvalidInputError(f"workers must be 1..{MAX_WORKERS}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise InvalidInputError(f"batch_size must be 1..{MAX_BATCH_SIZE}")


@dataclass(frozen=True)
class DekRotationOptions:
    """Options of a data-key rotation.

    Attributes:
        workers: threads, each taking whole tenants; other processes share the work
            the same way (a tenant is claimed through PostgreSQL).
        batch_size: rows per transaction.
        dry_run: count what would change; change nothing.
        new_key: switch each tenant to a new data key first; False only re-seals what
            is in the old format (or under a draining key) with the active key.
    """

    workers: int = 1
    batch_size: int = 1000
    dry_run: bool = False
    new_key: bool = True

    def __post_init__(self) -> None:
        _check(self.workers, self.batch_size)


@dataclass(frozen=True)
class KekRotationOptions:
    """Options of a transit-key (KEK) rotation.

    Attributes:
        rotate: make a new KEK version first (when nothing is left to rewrap);
            False only catches up (after the KMS rotated the key by itself).
        raise_min_decryption_version: afterwards, forbid unwrapping with older versions.
        dry_run: report what would change; change nothing (not even the KMS).
        batch_size: wrapped data keys per transaction.
        workers: threads, each rewrapping and storing batches of its own; other
            processes share the work the same way (a batch's rows are locked).
    """

    rotate: bool = True
    raise_min_decryption_version: bool = False
    dry_run: bool = False
    batch_size: int = 1000
    workers: int = 1

    def __post_init__(self) -> None:
        _check(self.workers, self.batch_size)
