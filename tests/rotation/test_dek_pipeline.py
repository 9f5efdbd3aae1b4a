"""A DEK rotation's worker prepares the next tenant while the current one is re-sealed:
claimed, counted, its keys unwrapped and switched by a thread of its own. Real
PostgreSQL and OpenBao; the provider is the real one, observed."""

from __future__ import annotations

import threading
import time
from typing import Any

import sqlalchemy as sa

from tenantvault import Vault
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

TENANTS = ["t_a", "t_b", "t_c"]
SWITCHED = {1: "draining", 2: "active"}


class _Threads(CountingProvider):
    """Records the thread of each call that reaches the provider."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.threads: list[tuple[str, str]] = []

    def generate_data_key(self, tenant_id: str) -> Any:
        self.threads.append(("generate", threading.current_thread().name))
        return super().generate_data_key(tenant_id)

    def unwrap(self, tenant_id: str, wrapped: str) -> bytes:
        self.threads.append(("unwrap", threading.current_thread().name))
        return super().unwrap(tenant_id, wrapped)


def _populated(vault: Vault, owner_engine: sa.Engine) -> dict[str, dict[tuple[str, str], str]]:
    add_tenants(owner_engine, TENANTS)
    return {tenant: populate(vault, tenant, configs=1) for tenant in TENANTS}


def _all_rotated(
    vault: Vault, owner_engine: sa.Engine, expected: dict[str, dict[tuple[str, str], str]]
) -> None:
    vault.keyring.cache.clear()
    for tenant in TENANTS:
        assert key_states(owner_engine, tenant) == {1: "retired", 2: "active"}
        assert set(sealed_versions(owner_engine, tenant)) == {2}
        assert open_everything(vault, tenant) == expected[tenant]


def test_the_next_tenant_is_switched_while_the_current_one_is_rotated(
    vault: Vault, operator_db: Any, provider: CountingProvider, owner_engine: sa.Engine
) -> None:
    expected = _populated(vault, owner_engine)
    seen: dict[str, dict[int, str]] = {}

    def on_progress(event: Progress) -> None:
        # t_a's first committed batch waits (at most 10 s) for t_b's switch: the worker
        # prepares t_b meanwhile; one that took tenants one after another never would.
        if event.tenant_id == "t_a" and event.column is not None and "t_b" not in seen:
            deadline = time.monotonic() + 10
            while key_states(owner_engine, "t_b") != SWITCHED and time.monotonic() < deadline:
                time.sleep(0.02)
            seen["t_b"] = key_states(owner_engine, "t_b")

    report = rotate_data_keys(
        operator_db,
        fresh_keyring(provider),
        TENANTS,
        DekRotationOptions(workers=1),
        on_progress=on_progress,
    )
    assert report.ok, report
    assert seen == {"t_b": SWITCHED}
    _all_rotated(vault, owner_engine, expected)


def test_the_worker_never_waits_on_the_key_provider(
    vault: Vault, operator_db: Any, provider: CountingProvider, owner_engine: sa.Engine
) -> None:
    expected = _populated(vault, owner_engine)
    observed = _Threads(provider.inner)

    report = rotate_data_keys(
        operator_db, fresh_keyring(observed), TENANTS, DekRotationOptions(workers=1)
    )
    assert report.ok, report
    # Each tenant's old key unwrapped and new key made: by the preparing thread, while
    # the worker re-sealed the tenant before.
    assert sorted(call for call, _ in observed.threads) == ["generate"] * 3 + ["unwrap"] * 3
    assert {thread.split("_")[0] for _, thread in observed.threads} == {"rotate-dek-prepare"}
    _all_rotated(vault, owner_engine, expected)


def test_a_stop_releases_the_tenant_prepared_ahead_and_a_rerun_finishes_it(
    vault: Vault, operator_db: Any, provider: CountingProvider, owner_engine: sa.Engine
) -> None:
    expected = _populated(vault, owner_engine)
    stop = threading.Event()

    def stop_after_first(event: Progress) -> None:
        if event.finished is not None:
            stop.set()

    report = rotate_data_keys(
        operator_db,
        fresh_keyring(provider),
        TENANTS,
        DekRotationOptions(workers=1),
        stop=stop,
        on_progress=stop_after_first,
    )
    assert report.stopped is not None
    assert not report.ok
    assert [t.tenant_id for t in report.tenants] == ["t_a"]
    # The same process's next run is not kept out: t_b's claim was released.
    rerun = rotate_data_keys(
        operator_db, fresh_keyring(provider), TENANTS[1:], DekRotationOptions(workers=1)
    )
    assert rerun.ok, rerun
    assert {t.tenant_id: t.outcome for t in rerun.tenants}["t_b"] in {"resumed", "rotated"}
    _all_rotated(vault, owner_engine, expected)


def test_a_stop_before_the_retirement_still_counts_every_seal_committed(
    vault: Vault, operator_db: Any, provider: CountingProvider, owner_engine: sa.Engine
) -> None:
    add_tenants(owner_engine, ["t_a"])
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
    # One batch committed (a column's only, hence last, batch), then the stop: the
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
    expected = _populated(vault, owner_engine)
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
        operator_db, fresh_keyring(provider), TENANTS, DekRotationOptions(workers=1)
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
