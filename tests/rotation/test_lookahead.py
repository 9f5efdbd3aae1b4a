"""A DEK rotation asks the key provider for the tenants next in line ahead: their
current keys unwrapped in batches, the next tenant's new key while the current one is
re-sealed. Real PostgreSQL and OpenBao; the provider is the real one, counted."""

from __future__ import annotations

import threading
from typing import Any

import sqlalchemy as sa

from tenantvault import Vault
from tenantvault.errors import KeyProviderUnavailable
from tenantvault.rotation.dek import Progress, rotate_data_keys
from tenantvault.rotation.options import DekRotationOptions
from tests.conftest import CountingProvider, fresh_keyring
from tests.rotation_support import (
    add_tenants,
    key_states,
    open_everything,
    populate,
    sealed_versions,
)

TENANTS = ["t_a", "t_b", "t_c", "t_d", "t_e"]


class _Observed(CountingProvider):
    """Records, per tenant, when its new key was asked for; ``fail_first`` makes the
    first request for those tenants fail as an unreachable transit would."""

    def __init__(self, inner: Any, fail_first: tuple[str, ...] = ()) -> None:
        super().__init__(inner)
        self.asked: dict[str, threading.Event] = {t: threading.Event() for t in TENANTS}
        self.fail_first = set(fail_first)

    def generate_data_key(self, tenant_id: str) -> Any:
        self.asked[tenant_id].set()
        if tenant_id in self.fail_first:
            self.fail_first.discard(tenant_id)
            self._count("generate")
            raise KeyProviderUnavailable("transit did not answer (test)")
        return super().generate_data_key(tenant_id)


def test_current_keys_are_unwrapped_in_one_batch_and_the_next_new_key_is_asked_ahead(
    vault: Vault, operator_db: Any, provider: CountingProvider, owner_engine: sa.Engine
) -> None:
    add_tenants(owner_engine, TENANTS)
    expected = {tenant: populate(vault, tenant, configs=1) for tenant in TENANTS}
    observed = _Observed(provider.inner)
    asked_before_done: dict[str, bool] = {}

    def on_progress(event: Progress) -> None:
        if event.finished is not None:
            following = TENANTS.index(event.tenant_id) + 1
            if following < len(TENANTS):
                # The next tenant's key is asked for while this one is rotated, not after.
                asked_before_done[event.tenant_id] = observed.asked[TENANTS[following]].is_set()

    report = rotate_data_keys(
        operator_db,
        fresh_keyring(observed),
        TENANTS,
        DekRotationOptions(workers=1),
        on_progress=on_progress,
    )
    assert report.ok, report
    assert [t.outcome for t in report.tenants] == ["rotated"] * len(TENANTS)
    # Five tenants' current keys: one batch request, no unwrap one at a time.
    assert observed.calls.get("unwrap_many") == 1
    assert observed.calls.get("unwrap", 0) == 0
    assert observed.calls["generate"] == len(TENANTS)
    assert asked_before_done == dict.fromkeys(TENANTS[:-1], True)
    vault.keyring.cache.clear()
    for tenant in TENANTS:
        assert set(sealed_versions(owner_engine, tenant)) == {2}
        assert open_everything(vault, tenant) == expected[tenant]


def test_a_new_key_that_failed_ahead_is_asked_for_again_in_line(
    vault: Vault, operator_db: Any, provider: CountingProvider, owner_engine: sa.Engine
) -> None:
    add_tenants(owner_engine, TENANTS)
    expected = {tenant: populate(vault, tenant, configs=1) for tenant in TENANTS[:3]}
    observed = _Observed(provider.inner, fail_first=("t_b",))

    report = rotate_data_keys(
        operator_db, fresh_keyring(observed), TENANTS[:3], DekRotationOptions(workers=1)
    )
    assert report.ok, report
    assert [t.outcome for t in report.tenants] == ["rotated"] * 3
    assert observed.calls["generate"] == 4  # t_b's failed request, and its second
    vault.keyring.cache.clear()
    for tenant in TENANTS[:3]:
        assert key_states(owner_engine, tenant) == {1: "retired", 2: "active"}
        assert open_everything(vault, tenant) == expected[tenant]


def test_a_resumed_tenant_drops_the_key_asked_for_it_and_makes_no_new_version(
    vault: Vault, operator_db: Any, provider: CountingProvider, owner_engine: sa.Engine
) -> None:
    expected = {tenant: populate(vault, tenant, configs=1) for tenant in TENANTS[:2]}
    # t_b's rotation stopped after its switch: key 2 active, key 1 draining.
    fresh_keyring(provider).switch(operator_db.transaction, "t_b", 1, "test")
    observed = _Observed(provider.inner)

    report = rotate_data_keys(
        operator_db, fresh_keyring(observed), TENANTS[:2], DekRotationOptions(workers=1)
    )
    assert report.ok, report
    assert [(t.outcome, t.from_version, t.to_version) for t in report.tenants] == [
        ("rotated", 1, 2),
        ("resumed", 1, 2),
    ]
    assert observed.asked["t_b"].is_set()  # asked ahead, and dropped unused
    assert key_states(owner_engine, "t_b") == {1: "retired", 2: "active"}
    vault.keyring.cache.clear()
    for tenant in TENANTS[:2]:
        assert open_everything(vault, tenant) == expected[tenant]
