"""KEK rotation against real OpenBao transit: rotate, rewrap in batches, catch up,
resume, and raise min_decryption_version only when nothing needs an older version;
an audit event for every key stored, the next batch's rewrap under way while a batch
is stored, and a tenant's keys in one batch. Each test has a transit key of its own,
so raising its minimum touches no other test."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import DecryptionError, Vault
from tenantvault.audit.chain import verify_audit
from tenantvault.errors import KeyProviderUnavailable, RotationError
from tenantvault.keys import store
from tenantvault.rotation.dek import rotate_data_keys
from tenantvault.rotation.kek import KekProgress, rotate_kek
from tenantvault.rotation.options import DekRotationOptions, KekRotationOptions
from tenantvault.rotation.status import key_status
from tenantvault.settings import Settings
from tests.conftest import CountingProvider, Services, fresh_keyring, transit_provider
from tests.rotation_support import add_tenants, open_everything, populate

TENANTS = [f"t_k{n}" for n in range(7)]


@pytest.fixture
def own_provider(services: Services) -> CountingProvider:
    return CountingProvider(transit_provider(services, key_name=f"kek-{uuid.uuid4().hex[:8]}"))


@pytest.fixture
def own_vault(
    app_settings: Settings, own_provider: CountingProvider, owner_engine: sa.Engine
) -> Any:
    built = Vault.from_settings(app_settings, key_provider=own_provider)
    add_tenants(owner_engine, TENANTS)
    expected = {t: populate(built, t, configs=1) for t in TENANTS}
    yield built, expected
    built.dispose()


def _wrapped(owner_engine: sa.Engine) -> dict[tuple[str, int], tuple[str, int]]:
    with owner_engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT tenant_id, version, wrapped_key, kek_version FROM dripiq_app.tenant_data_keys"
            )
        )
        return {(t, v): (w, k) for t, v, w, k in rows}


def test_rotation_rewraps_every_data_key_in_batches_and_values_still_open(
    own_vault: Any, own_provider: CountingProvider, operator_db: Any, owner_engine: sa.Engine
) -> None:
    vault, expected = own_vault
    before = _wrapped(owner_engine)
    progress: list[KekProgress] = []
    own_provider.calls.clear()
    report = rotate_kek(
        operator_db, own_provider, KekRotationOptions(batch_size=3), on_progress=progress.append
    )
    assert report.ok
    assert (report.kek_before, report.kek_after, report.rotated, report.rewrapped) == (
        1,
        2,
        True,
        7,
    )
    # Three database batches of at most three keys; one provider call each.
    assert [p.rewrapped for p in progress] == [3, 6, 7]
    assert own_provider.calls["rewrap"] == 3
    after = _wrapped(owner_engine)
    assert set(after) == set(before)
    for place, (wrapped, kek) in after.items():
        assert kek == 2
        assert wrapped.startswith("vault:v2:")
        assert wrapped != before[place][0]
    vault.keyring.cache.clear()
    assert {t: open_everything(vault, t) for t in TENANTS} == expected
    assert key_status(operator_db, own_provider).behind_kek == 0


def test_catch_up_after_vault_rotated_by_itself_does_not_rotate_again(
    own_vault: Any, own_provider: CountingProvider, operator_db: Any, owner_engine: sa.Engine
) -> None:
    own_provider.rotate_kek()  # as auto_rotate_period would
    assert key_status(operator_db, own_provider).behind_kek == 7
    report = rotate_kek(operator_db, own_provider, KekRotationOptions(rotate=False))
    assert (report.kek_after, report.rotated, report.rewrapped, report.behind) == (2, False, 7, 0)
    assert own_provider.kek_version() == 2


def test_an_interrupted_run_is_finished_by_the_next_one_without_a_second_rotation(
    own_vault: Any, own_provider: CountingProvider, operator_db: Any, owner_engine: sa.Engine
) -> None:
    stop = threading.Event()
    first = rotate_kek(
        operator_db,
        own_provider,
        KekRotationOptions(batch_size=2),
        stop=stop,
        on_progress=lambda _: stop.set(),
    )
    assert first.stopped is not None
    assert (first.rewrapped, first.behind) == (2, 5)
    second = rotate_kek(operator_db, own_provider, KekRotationOptions(batch_size=2))
    assert second.ok
    assert (second.rotated, second.kek_after, second.rewrapped) == (False, 2, 5)
    assert {kek for _, kek in _wrapped(owner_engine).values()} == {2}


def test_two_runs_started_together_rotate_the_key_once(
    own_vault: Any, own_provider: CountingProvider, operator_db: Any
) -> None:
    reports: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda: reports.append(
                rotate_kek(operator_db, own_provider, KekRotationOptions(batch_size=1))
            )
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert own_provider.kek_version() == 2
    assert sorted(r.rotated for r in reports) == [False, True]
    assert sum(r.rewrapped for r in reports) == 7
    assert all(r.ok for r in reports)


def test_dry_run_changes_neither_vault_nor_the_database(
    own_vault: Any, own_provider: CountingProvider, operator_db: Any, owner_engine: sa.Engine
) -> None:
    before = _wrapped(owner_engine)
    report = rotate_kek(
        operator_db,
        own_provider,
        KekRotationOptions(dry_run=True, raise_min_decryption_version=True),
    )
    assert (report.dry_run, report.kek_before, report.kek_after, report.behind) == (True, 1, 2, 7)
    assert own_provider.kek_version() == 1
    assert _wrapped(owner_engine) == before


def test_min_decryption_version_is_refused_while_a_data_key_needs_an_old_version(
    own_vault: Any, own_provider: CountingProvider, operator_db: Any, owner_engine: sa.Engine
) -> None:
    vault, expected = own_vault
    old_wrapped = _wrapped(owner_engine)
    # t_k3's wrapped key replaced by t_k2's: Vault refuses to rewrap it for t_k3
    # (another derivation context), so it stays on KEK version 1.
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.tenant_data_keys SET wrapped_key = :w WHERE tenant_id = 't_k3'"
            ),
            {"w": old_wrapped[("t_k2", 1)][0]},
        )
    with pytest.raises(
        RotationError, match=r"still need a KEK version older than 2 \(rewrap refused for t_k3 v1\)"
    ):
        rotate_kek(operator_db, own_provider, KekRotationOptions(raise_min_decryption_version=True))
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.tenant_data_keys SET wrapped_key = :w WHERE tenant_id = 't_k3'"
            ),
            {"w": old_wrapped[("t_k3", 1)][0]},
        )
    assert own_provider.min_decryption_version() == 1

    report = rotate_kek(
        operator_db, own_provider, KekRotationOptions(raise_min_decryption_version=True)
    )
    assert (report.rotated, report.rewrapped, report.min_decryption_version) == (False, 1, 2)
    assert own_provider.min_decryption_version() == 2
    vault.keyring.cache.clear()
    assert {t: open_everything(vault, t) for t in TENANTS} == expected
    # A wrapped key from before (an old backup) no longer unwraps.
    with pytest.raises(DecryptionError):
        own_provider.unwrap("t_k3", old_wrapped[("t_k3", 1)][0])


def _rewrap_events(operator_db: Any) -> list[tuple[str, str | None, str | None, dict[str, Any]]]:
    """(tenant, actor, key version, details) of every kek.rewrapped event, in chain order."""
    with operator_db.transaction() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT tenant_id, actor, target_id, details FROM dripiq_app.audit_events "
                "WHERE action = 'kek.rewrapped' AND target_type = 'dek' ORDER BY tenant_id, seq"
            )
        )
        return [(t, a, v, d) for t, a, v, d in rows]


def test_every_key_stored_has_its_own_audit_event_and_the_chains_verify(
    own_vault: Any, own_provider: CountingProvider, operator_db: Any
) -> None:
    report = rotate_kek(operator_db, own_provider, KekRotationOptions(batch_size=3))
    assert report.ok
    assert _rewrap_events(operator_db) == [
        (tenant, "rotate-keys", "1", {"kek_version": 2, "kek_ref": own_provider.ref})
        for tenant in TENANTS
    ]
    verified = verify_audit(operator_db, TENANTS)
    assert verified.ok, verified.breaks
    assert verified.events > len(TENANTS)  # the events from before are on the same chains


def test_a_key_changed_since_it_was_read_is_not_stored_and_gets_no_event(
    own_vault: Any, own_provider: CountingProvider, operator_db: Any, owner_engine: sa.Engine
) -> None:
    own_provider.rotate_kek()
    before = _wrapped(owner_engine)
    items = [(t, before[(t, 1)][0]) for t in ("t_k0", "t_k1")]
    new = [r.wrapped for r in own_provider.rewrap(items) if r.wrapped is not None]
    assert len(new) == 2
    with operator_db.transaction() as connection:
        stored = store.store_rewrapped(
            connection,
            [
                store.Rewrapped("t_k0", 1, before[("t_k0", 1)][0], new[0], own_provider.ref),
                # As if a writer had replaced t_k1's key after the batch read it.
                store.Rewrapped("t_k1", 1, before[("t_k0", 1)][0], new[1], own_provider.ref),
            ],
            actor="rotate-keys",
        )
    assert stored == 1
    after = _wrapped(owner_engine)
    assert after[("t_k0", 1)][1] == 2
    assert after[("t_k1", 1)] == before[("t_k1", 1)]
    assert [(t, v) for t, _, v, _ in _rewrap_events(operator_db)] == [("t_k0", "1")]


def test_a_tenants_keys_are_never_split_between_two_batches(
    own_vault: Any, own_provider: CountingProvider, operator_db: Any
) -> None:
    # t_k0 gets a second key version; its retired first one is rewrapped too.
    rotated = rotate_data_keys(
        operator_db, fresh_keyring(own_provider), ["t_k0"], DekRotationOptions()
    )
    assert rotated.ok
    progress: list[KekProgress] = []
    report = rotate_kek(
        operator_db, own_provider, KekRotationOptions(batch_size=1), on_progress=progress.append
    )
    assert report.ok
    # Batches of one key, but t_k0's two keys go together.
    assert [p.rewrapped for p in progress] == [2, 3, 4, 5, 6, 7, 8]
    assert [(t, v) for t, _, v, _ in _rewrap_events(operator_db)][:2] == [
        ("t_k0", "1"),
        ("t_k0", "2"),
    ]


class _Observed(CountingProvider):
    """Sets ``started[n]`` when the n-th rewrap call reaches it; ``fail_on`` makes that
    call fail as an unreachable transit would."""

    def __init__(self, inner: Any, fail_on: int | None = None) -> None:
        super().__init__(inner)
        self.started = [threading.Event() for _ in range(20)]
        self.fail_on = fail_on

    def rewrap(self, items: Any) -> Any:
        number = self.calls.get("rewrap", 0)
        self.started[number].set()
        if number == self.fail_on:
            self._count("rewrap")
            raise KeyProviderUnavailable("transit did not answer (test)")
        return super().rewrap(items)


def test_the_next_batch_is_rewrapped_while_the_one_before_is_stored(
    own_vault: Any, own_provider: CountingProvider, operator_db: Any
) -> None:
    observed = _Observed(own_provider.inner)
    seen_during_progress: list[bool] = []

    def first_committed(event: KekProgress) -> None:
        if not seen_during_progress:
            # The second batch's rewrap starts without waiting for the first's commit.
            seen_during_progress.append(observed.started[1].wait(timeout=10))

    report = rotate_kek(
        operator_db, observed, KekRotationOptions(batch_size=3), on_progress=first_committed
    )
    assert report.ok
    assert report.rewrapped == 7
    assert seen_during_progress == [True]
    assert observed.calls["rewrap"] == 3


def test_transit_failing_for_the_batch_sent_ahead_rolls_it_back_and_a_rerun_finishes(
    own_vault: Any, own_provider: CountingProvider, operator_db: Any, owner_engine: sa.Engine
) -> None:
    vault, expected = own_vault
    observed = _Observed(own_provider.inner, fail_on=1)
    progress: list[KekProgress] = []
    with pytest.raises(KeyProviderUnavailable):
        rotate_kek(
            operator_db, observed, KekRotationOptions(batch_size=3), on_progress=progress.append
        )
    assert [p.rewrapped for p in progress] == [3]
    assert sorted(kek for _, kek in _wrapped(owner_engine).values()) == [1, 1, 1, 1, 2, 2, 2]
    # Both batches' transactions ended: no connection is left out of the pool.
    assert operator_db.engine.pool.checkedout() == 0
    assert [t for t, _, _, _ in _rewrap_events(operator_db)] == TENANTS[:3]

    rerun = rotate_kek(operator_db, own_provider, KekRotationOptions(batch_size=3))
    assert (rerun.ok, rerun.rotated, rerun.rewrapped) == (True, False, 4)
    vault.keyring.cache.clear()
    assert {t: open_everything(vault, t) for t in TENANTS} == expected


class _Together(CountingProvider):
    """Holds the first two rewrap calls until both have arrived, so they are under way
    at once (two workers' batches); ``fail_on`` makes that call (counted from 0, in the
    order the calls arrive) fail as an unreachable transit would."""

    def __init__(self, inner: Any, fail_on: int | None = None) -> None:
        super().__init__(inner)
        self.both = threading.Barrier(2, timeout=10)
        self.fail_on = fail_on
        self._order = threading.Lock()
        self._arrived = 0

    def rewrap(self, items: Any) -> Any:
        with self._order:
            number = self._arrived
            self._arrived += 1
        if number < 2:
            self.both.wait()  # broken (an error) unless a second worker sends meanwhile
        if number == self.fail_on:
            raise KeyProviderUnavailable("transit did not answer (test)")
        return self.inner.rewrap(items)


def test_workers_rewrap_batches_at_once_and_store_each_key_once(
    own_vault: Any, own_provider: CountingProvider, operator_db: Any, owner_engine: sa.Engine
) -> None:
    vault, expected = own_vault
    together = _Together(own_provider.inner)
    progress: list[KekProgress] = []
    report = rotate_kek(
        operator_db,
        together,
        KekRotationOptions(batch_size=1, workers=2),
        on_progress=progress.append,
    )
    assert report.ok
    assert (report.rotated, report.rewrapped, report.behind) == (True, 7, 0)
    # Progress is counted across the workers, one key more each time.
    assert sorted(p.rewrapped for p in progress) == list(range(1, 8))
    assert {kek for _, kek in _wrapped(owner_engine).values()} == {2}
    assert sorted((t, v) for t, _, v, _ in _rewrap_events(operator_db)) == [
        (t, "1") for t in TENANTS
    ]
    verified = verify_audit(operator_db, TENANTS)
    assert verified.ok, verified.breaks
    vault.keyring.cache.clear()
    assert {t: open_everything(vault, t) for t in TENANTS} == expected


def test_a_failing_worker_stops_the_others_and_a_rerun_finishes(
    own_vault: Any, own_provider: CountingProvider, operator_db: Any, owner_engine: sa.Engine
) -> None:
    vault, expected = own_vault
    together = _Together(own_provider.inner, fail_on=2)
    with pytest.raises(KeyProviderUnavailable):
        rotate_kek(operator_db, together, KekRotationOptions(batch_size=1, workers=2))
    # The other worker stopped: not every key was rewrapped, every stored one has its
    # event, and no transaction was left open.
    keks = [kek for _, kek in _wrapped(owner_engine).values()]
    assert 1 <= keks.count(2) < 7
    assert len(_rewrap_events(operator_db)) == keks.count(2)
    assert operator_db.engine.pool.checkedout() == 0

    rerun = rotate_kek(operator_db, own_provider, KekRotationOptions(workers=2))
    assert (rerun.ok, rerun.rotated, rerun.rewrapped) == (True, False, 7 - keks.count(2))
    vault.keyring.cache.clear()
    assert {t: open_everything(vault, t) for t in TENANTS} == expected


def test_workers_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="workers"):
        KekRotationOptions(workers=0)
