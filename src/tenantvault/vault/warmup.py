"""A tenant's keys seen from the application: fleet warm-up (a cold process unwraps many
tenants' data keys in a few requests) and which KEK wraps a tenant's keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic

from tenantvault.db.session import check_tenant_id
from tenantvault.errors import InvalidInputError
from tenantvault.keys import store
from tenantvault.keys.warmup import WarmReport
from tenantvault.vault.core import CallerSession, VaultCore
from tenantvault.vault.methods import FacadeMethods, Runs


class WarmupService(Generic[CallerSession]):
    """Filling the key cache before traffic does; which KEK a tenant's keys are under."""

    def __init__(self, core: VaultCore[CallerSession]) -> None:
        self._core = core

    def tenant_key(self, tenant_id: str, *, session: CallerSession | None = None) -> str:
        """The reference of the KEK that wraps ``tenant_id``'s new data keys: the one
        an operator set for it (``tenantvault tenant-key set``: a customer-managed key),
        or the deployment's (``transit:<TENANTVAULT_TRANSIT_KEY>``, ``awskms:<key id>``)."""
        with self._core.scope(tenant_id, session) as s:
            own = store.tenant_kek(s.connection(), tenant_id)
        return own or self._core.keyring.keks.default_ref

    def warm(self, tenant_ids: Sequence[str]) -> WarmReport:
        """Unwrap and cache the usable data keys (active and draining) of ``tenant_ids``
        in batch requests to the key provider: ceil(K / ``TENANTVAULT_TRANSIT_BATCH_SIZE``)
        requests for K keys not cached yet, instead of one per key on each first load.

        Each tenant's keys are read in a transaction scoped to that tenant (row-level
        security applies, as for a load), on a hot standby when one is current enough
        (``TENANTVAULT_READ_DATABASE_URLS``), as loads are. A key that does not unwrap
        is reported and fails only itself; an outage or a full cache
        (``TENANTVAULT_DEK_CACHE_MAX_ENTRIES``)
        stops the warm-up, and the report says where and why. The keys stay cached
        within the cache's bounds, as loaded keys do.

        Raises:
            InvalidInputError: ``tenant_ids`` is one string, or an id is malformed
                (``TenantNotSetError``; nothing is read, the message names ``tenant_id``).
        """
        if isinstance(tenant_ids, str):
            raise InvalidInputError("tenant_ids must be a sequence of tenant ids, not one string")
        checked = [check_tenant_id(tenant_id) for tenant_id in tenant_ids]
        return self._core.keyring.warm(self._core.read_transaction, checked)


class WarmupMethods(FacadeMethods[CallerSession]):
    """WarmupService's methods on both facades (:mod:`tenantvault.vault.methods`)."""

    tenant_key = Runs(WarmupService[CallerSession].tenant_key)

    warm = Runs(
        WarmupService[CallerSession].warm,
        async_note="the batch unwraps run in the key provider's worker threads, and the "
        "backoff after a failed unwrap is the core's own",
    )
