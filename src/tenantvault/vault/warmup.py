"""Fleet warm-up: a cold process unwraps many tenants' data keys in a few requests."""

from __future__ import annotations

from collections.abc import Sequence

from tenantvault.db.session import check_tenant_id
from tenantvault.errors import InvalidInputError
from tenantvault.keys.warmup import WarmReport
from tenantvault.vault.core import VaultCore


class Warmup(VaultCore):
    """Filling the key cache before traffic does."""

    def warm(self, tenant_ids: Sequence[str]) -> WarmReport:
        """Unwrap and cache the usable data keys (active and draining) of ``tenant_ids``
        in batch requests to the key provider: ceil(K / ``TENANTVAULT_TRANSIT_BATCH_SIZE``)
        requests for K keys not cached yet, instead of one per key on each first load.

        Each tenant's keys are read in a transaction scoped to that tenant (row-level
        security applies, as for a load). A key that does not unwrap is reported and
        fails only itself; an outage or a full cache (``TENANTVAULT_DEK_CACHE_MAX_ENTRIES``)
        stops the warm-up, and the report says where and why. The keys stay cached
        within the cache's bounds, as loaded keys do.

        Raises:
            InvalidInputError: ``tenant_ids`` is one string, or an id is malformed
                (``TenantNotSetError``; nothing is read, the message names ``tenant_id``).
        """
        if isinstance(tenant_ids, str):
            raise InvalidInputError("tenant_ids must be a sequence of tenant ids, not one string")
        checked = [check_tenant_id(tenant_id) for tenant_id in tenant_ids]
        return self.keyring.warm(self.engine.begin, checked)
