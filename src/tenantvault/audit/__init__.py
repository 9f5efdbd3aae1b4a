"""The audit log: events written in the caller's transaction, and the operator's
chain jobs (verify, partitions, prune) in ``tenantvault.audit.chain``."""

from tenantvault.audit.events import Event, insert_per_row, record, record_many

__all__ = ["Event", "insert_per_row", "record", "record_many"]
