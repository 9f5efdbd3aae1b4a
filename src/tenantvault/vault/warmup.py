"""Fleet warm-up: a cold process unwraps many tenants' data keys in a few requests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tenantvault.db.session import check_tenant_id
from tenantvault.errors import InvalidInputError
from tenantvault.keys.warmup import WarmReport
from tenantvault.vault.core import CallerSession, VaultCore
from tenantvault.vault.methods import FacadeMethods, Runs


class WarmupService:
    """Filling the key cache before traffic does."""

    def __init__(self, core: VaultCore[Any]) -> None:
        self._core = core

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
        return self._core.keyring.warm(self._core.engine.begin, checked)


class WarmupMethods(FacadeMethods[CallerSession]):
    """WarmupService's method on both facades (:mod:`tenantvault.vault.methods`)."""

    warm = Runs(
        WarmupService.warm,
        async_note="the batch unwraps run in the key provider's worker threads, and the "
        "backoff after a failed unwrap is the core's own",
    )
