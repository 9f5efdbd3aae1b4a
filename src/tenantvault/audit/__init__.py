"""The audit log: events written in the caller's transaction, and the operator's
chain jobs (verify, partitions, prune) in ``tenantvault.audit.chain``."""

from tenantvault.audit.events import Event, record, record_many

__all__ = ["Event", "record", "record_many"]
