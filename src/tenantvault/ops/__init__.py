"""One function per operator command, each returning a report: what the CLI calls,
and what a scheduler may call (``from tenantvault.ops import rotate_dek_job``)."""

from tenantvault.ops.health import status
from tenantvault.ops.jobs import (
    audit_partitions_job,
    audit_prune_job,
    audit_verify_job,
    purge_job,
    rotate_dek_job,
    rotate_kek_job,
    rotation_status,
    shred_job,
)
from tenantvault.ops.migrate import downgrade, upgrade
from tenantvault.rotation.options import DekRotationOptions, KekRotationOptions

__all__ = [
    "DekRotationOptions",
    "KekRotationOptions",
    "audit_partitions_job",
    "audit_prune_job",
    "audit_verify_job",
    "downgrade",
    "purge_job",
    "rotate_dek_job",
    "rotate_kek_job",
    "rotation_status",
    "shred_job",
    "status",
    "upgrade",
]
