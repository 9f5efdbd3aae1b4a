"""A DEK rotation asks the key provider for the tenants next in line ahead: their
current keys unwrapped in batches, the next tenant's new key while the current one is
re-sealed. Real PostgreSQL and OpenBao; the provider is the real one, counted."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import Vault
from tenantvault.errors import KeyProviderError, KeyProviderUnavailable
from tenantvault.rotation.dek import Progress, rotate_data_keys
from tenantvault.rotation.kek import rotate_kek
from tenantvault.rotation.options import DekRotationOptions
from tenantvault.settings import Settings
from tests.conftest import CountingProvider, Services, fresh_keyring, transit_provider
from tests.rotation_support import (
    add_tenants,
    kek_versions,
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


def test_a_warm_up_that_fails_leaves_the_keys_to_be_unwrapped_in_line(
    vault: Vault, operator_db: Any, provider: CountingProvider, owner_engine: sa.Engine
) -> None:
    add_tenants(owner_engine, TENANTS)
    expected = {tenant: populate(vault, tenant, configs=1) for tenant in TENANTS[:3]}

    class _BatchRefused(_Observed):
        def unwrap_many(self, items: Any) -> Any:
            self._count("unwrap_many")
            raise KeyProviderError("key provider answered an unwrap batch with the wrong count")

    observed = _BatchRefused(provider.inner)
    report = rotate_data_keys(
        operator_db, fresh_keyring(observed), TENANTS[:3], DekRotationOptions(workers=1)
    )
    # Not a worker dead in silence, nor a stop: each key unwrapped in line instead.
    assert report.ok, report
    assert [t.outcome for t in report.tenants] == ["rotated"] * 3
    assert observed.calls["unwrap_many"] == 1
    assert observed.calls["unwrap"] == 3
    vault.keyring.cache.clear()
    for tenant in TENANTS[:3]:
        assert open_everything(vault, tenant) == expected[tenant]


@pytest.fixture
def own_vault(
    services: Services, app_settings: Settings
) -> Iterator[tuple[Vault, CountingProvider]]:
    """A Vault on a transit key of its own: a KEK rotation there touches no other test."""
    own = CountingProvider(transit_provider(services, key_name=f"dek-{uuid.uuid4().hex[:8]}"))
    vault = Vault.from_settings(app_settings, key_provider=own)
    yield vault, own
    vault.dispose()


def test_a_new_key_asked_ahead_of_a_kek_rotation_is_not_stored(
    own_vault: tuple[Vault, CountingProvider], operator_db: Any, owner_engine: sa.Engine
) -> None:
    vault, own = own_vault
    add_tenants(owner_engine, TENANTS)
    expected = {tenant: populate(vault, tenant, configs=1) for tenant in TENANTS[:2]}
    observed = _Observed(own.inner)
    rotated_kek: list[int] = []

    def kek_rotation_during_t_a(event: Progress) -> None:
        # t_b's new key was asked for when t_a was taken: under KEK version 1.
        if event.tenant_id == "t_a" and event.column is not None and not rotated_kek:
            assert observed.asked["t_b"].wait(timeout=10)
            kek = rotate_kek(operator_db, own.inner)
            assert kek.ok, kek
            rotated_kek.append(kek.rewrapped)

    report = rotate_data_keys(
        operator_db,
        fresh_keyring(observed),
        TENANTS[:2],
        DekRotationOptions(workers=1),
        on_progress=kek_rotation_during_t_a,
    )
    assert report.ok, report
    assert rotated_kek
    # t_b's new key is the one asked for again after the refusal, under KEK version 2.
    assert kek_versions(owner_engine, "t_b") == {1: 2, 2: 2}
    assert observed.calls["generate"] == 3
    vault.keyring.cache.clear()
    for tenant in TENANTS[:2]:
        assert open_everything(vault, tenant) == expected[tenant]


def test_a_stop_between_two_tenants_is_reported_and_a_rerun_finishes(
    vault: Vault, operator_db: Any, provider: CountingProvider, owner_engine: sa.Engine
) -> None:
    add_tenants(owner_engine, TENANTS)
    expected = {tenant: populate(vault, tenant, configs=1) for tenant in TENANTS[:3]}
    stop = threading.Event()

    def stop_after_first(event: Progress) -> None:
        if event.finished is not None:
            stop.set()

    report = rotate_data_keys(
        operator_db,
        fresh_keyring(provider),
        TENANTS[:3],
        DekRotationOptions(workers=1),
        stop=stop,
        on_progress=stop_after_first,
    )
    # Stopped after t_a, before t_b began: the run must not read as whole.
    assert [t.tenant_id for t in report.tenants] == ["t_a"]
    assert report.stopped is not None
    assert not report.ok
    rerun = rotate_data_keys(
        operator_db, fresh_keyring(provider), TENANTS[1:3], DekRotationOptions(workers=1)
    )
    assert rerun.ok, rerun
    vault.keyring.cache.clear()
    for tenant in TENANTS[:3]:
        assert key_states(owner_engine, tenant) == {1: "retired", 2: "active"}
        assert open_everything(vault, tenant) == expected[tenant]


def test_a_stop_before_the_retirement_still_counts_every_seal_committed(
    vault: Vault, operator_db: Any, provider: CountingProvider, owner_engine: sa.Engine
) -> None:
    populate(vault, "t_a", configs=2)
    stop = threading.Event()
    committed: list[int] = []

    def stop_after_first_batch(event: Progress) -> None:
        if event.column is not None:
            committed.append(event.rows)
            stop.set()

    report = rotate_data_keys(
        operator_db,
        fresh_keyring(provider),
        ["t_a"],
        DekRotationOptions(workers=1),
        stop=stop,
        on_progress=stop_after_first_batch,
    )
    assert report.stopped is not None
    # One batch committed (its column's only, hence last, batch), then the stop: the
    # retirement that would have counted its seals never ran.
    assert len(committed) == 1
    assert committed[0] > 0
    with owner_engine.connect() as connection:
        seals = connection.execute(
            sa.text(
                "SELECT seals FROM dripiq_app.tenant_data_keys "
                "WHERE tenant_id = 't_a' AND version = 2"
            )
        ).scalar_one()
    assert seals == committed[0]


def test_a_data_key_that_does_not_unwrap_ahead_is_reported_by_value_as_before(
    vault: Vault, operator_db: Any, provider: CountingProvider, owner_engine: sa.Engine
) -> None:
    add_tenants(owner_engine, TENANTS)
    expected = {tenant: populate(vault, tenant, configs=1) for tenant in TENANTS[:3]}
    # t_b's key swapped for t_c's: transit refuses it for t_b (its context is t_c).
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.tenant_data_keys SET wrapped_key = (SELECT wrapped_key "
                "FROM dripiq_app.tenant_data_keys WHERE tenant_id = 't_c' AND version = 1) "
                "WHERE tenant_id = 't_b' AND version = 1"
            )
        )
    report = rotate_data_keys(
        operator_db, fresh_keyring(provider), TENANTS[:3], DekRotationOptions(workers=1)
    )
    # Not a stop: t_b's values are reported by place, the other tenants rotate.
    assert report.stopped is None
    outcomes = {t.tenant_id: t.outcome for t in report.tenants}
    assert outcomes == {"t_a": "rotated", "t_b": "incomplete", "t_c": "rotated"}
    assert {item.tenant_id for item in report.unopenable} == {"t_b"}
    assert {item.error for item in report.unopenable} == {"DecryptionError"}
    vault.keyring.cache.clear()
    for tenant in ("t_a", "t_c"):
        assert open_everything(vault, tenant) == expected[tenant]


def test_a_new_key_made_in_line_before_a_kek_rotation_is_made_again(
    own_vault: tuple[Vault, CountingProvider], operator_db: Any, owner_engine: sa.Engine
) -> None:
    vault, own = own_vault
    add_tenants(owner_engine, ["t_b"])
    expected = populate(vault, "t_b", configs=1)
    # A key Vault made under KEK version 1, handed out after the KEK rotation below:
    # as if Vault answered the switch's request just before that rotation ran.
    made_before = own.inner.generate_data_key("t_b")
    kek = rotate_kek(operator_db, own.inner)
    assert kek.ok, kek

    class _Late(_Observed):
        def generate_data_key(self, tenant_id: str) -> Any:
            self._count("generate")
            if self.calls["generate"] == 1:
                return made_before
            return self.inner.generate_data_key(tenant_id)

    observed = _Late(own.inner)
    report = rotate_data_keys(
        operator_db, fresh_keyring(observed), ["t_b"], DekRotationOptions(workers=1)
    )
    assert report.ok, report
    assert observed.calls["generate"] == 2
    assert kek_versions(owner_engine, "t_b") == {1: 2, 2: 2}
    vault.keyring.cache.clear()
    assert open_everything(vault, "t_b") == expected
