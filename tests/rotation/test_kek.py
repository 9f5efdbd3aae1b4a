"""KEK rotation against real OpenBao transit: rotate, rewrap in batches, catch up,
resume, and raise min_decryption_version only when nothing needs an older version.
Each test has a transit key of its own, so raising its minimum touches no other test."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import DecryptionError, Vault
from tenantvault.errors import RotationError
from tenantvault.rotation.kek import KekProgress, rotate_kek
from tenantvault.rotation.options import KekRotationOptions
from tenantvault.rotation.status import key_status
from tenantvault.settings import Settings
from tests.conftest import CountingProvider, Services, transit_provider
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
