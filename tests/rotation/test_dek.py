"""DEK rotation against real PostgreSQL (operator and application roles) and real OpenBao."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import KeyDestroyedError, RotationError, Vault
from tenantvault.rotation import dek
from tenantvault.rotation.dek import rotate_data_keys
from tenantvault.rotation.options import DekRotationOptions
from tenantvault.rotation.shred import shred_tenant
from tenantvault.rotation.status import key_status
from tests.conftest import fresh_keyring
from tests.rotation_support import (
    add_tenants,
    key_states,
    open_everything,
    populate,
    sealed_versions,
)


def test_two_rotations_in_a_row_reseal_everything_and_retire_the_old_keys(
    vault: Vault, operator_db: Any, provider: Any, owner_engine: sa.Engine
) -> None:
    expected = populate(vault, "t_a")
    other = populate(vault, "t_b")
    before_b = sealed_versions(owner_engine, "t_b")
    total = sum(sealed_versions(owner_engine, "t_a").values())

    first = rotate_data_keys(
        operator_db, fresh_keyring(provider), ["t_a"], DekRotationOptions(batch_size=2)
    )
    assert first.ok, first
    assert [(t.outcome, t.from_version, t.to_version, t.retired) for t in first.tenants] == [
        ("rotated", 1, 2, [1])
    ]
    assert first.resealed == total
    assert sealed_versions(owner_engine, "t_a") == {2: total}

    second = rotate_data_keys(
        operator_db, fresh_keyring(provider), ["t_a"], DekRotationOptions(batch_size=3)
    )
    assert second.ok
    assert second.resealed == total
    assert sealed_versions(owner_engine, "t_a") == {3: total}
    assert key_states(owner_engine, "t_a") == {1: "retired", 2: "retired", 3: "active"}

    vault.keyring.cache.clear()
    assert open_everything(vault, "t_a") == expected
    # The other tenant was not asked for and did not move.
    assert sealed_versions(owner_engine, "t_b") == before_b
    assert open_everything(vault, "t_b") == other


def test_all_tenants_with_several_workers_and_status_before_and_after(
    vault: Vault, operator_db: Any, provider: Any, owner_engine: sa.Engine
) -> None:
    tenants = [f"t_w{n}" for n in range(6)]
    add_tenants(owner_engine, tenants)
    expected = {t: populate(vault, t, configs=2) for t in tenants}
    before = key_status(operator_db, provider)
    assert {t.tenant_id: t.active_version for t in before.tenants} == dict.fromkeys(tenants, 1)
    report = rotate_data_keys(
        operator_db, fresh_keyring(provider), None, DekRotationOptions(workers=3, batch_size=4)
    )
    assert report.ok
    assert sorted(t.tenant_id for t in report.tenants) == tenants
    after = key_status(operator_db, provider)
    for tenant in after.tenants:
        assert tenant.active_version == 2
        assert [(k.version, k.state, k.protects > 0) for k in tenant.keys] == [
            (1, "retired", False),
            (2, "active", True),
        ]
    vault.keyring.cache.clear()
    assert {t: open_everything(vault, t) for t in tenants} == expected


def test_tenants_without_keys_or_without_secrets(
    vault: Vault, operator_db: Any, provider: Any, owner_engine: sa.Engine
) -> None:
    add_tenants(owner_engine, ["t_empty"])
    # t_b has a key (made by a config with credentials) but the config is gone from
    # every sealed column: the token-less, credential-less state.
    cfg = vault.create_config(
        "t_b", type="smtp", name="s", config=SMTP_CONFIG, credentials={"password": "x"}
    )
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE dripiq_app.email_provider_configs SET encrypted_credentials = NULL")
        )
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.email_provider_config_versions SET encrypted_credentials = NULL"
            )
        )
    report = rotate_data_keys(operator_db, fresh_keyring(provider), ["t_empty", "t_b"])
    assert report.ok
    outcomes = {t.tenant_id: (t.outcome, t.resealed, t.retired) for t in report.tenants}
    assert outcomes == {"t_empty": ("no keys", {}, []), "t_b": ("rotated", {}, [1])}
    assert key_states(owner_engine, "t_b") == {1: "retired", 2: "active"}
    assert cfg.id


def test_dry_run_reports_what_would_change_and_changes_nothing(
    vault: Vault, operator_db: Any, provider: Any, owner_engine: sa.Engine
) -> None:
    populate(vault, "t_a")
    with owner_engine.connect() as connection:
        snapshot = connection.execute(
            sa.text("SELECT * FROM dripiq_app.email_provider_configs ORDER BY id")
        ).all()
    report = rotate_data_keys(
        operator_db, fresh_keyring(provider), ["t_a"], DekRotationOptions(dry_run=True)
    )
    [tenant] = report.tenants
    assert (tenant.outcome, tenant.from_version, tenant.to_version, tenant.retired) == (
        "would rotate",
        1,
        2,
        [1],
    )
    assert sum(tenant.resealed.values()) == sum(sealed_versions(owner_engine, "t_a").values())
    assert tenant.resealed["email_provider_tokens.encrypted_refresh_token"] == 1
    assert key_states(owner_engine, "t_a") == {1: "active"}
    with owner_engine.connect() as connection:
        assert (
            connection.execute(
                sa.text("SELECT * FROM dripiq_app.email_provider_configs ORDER BY id")
            ).all()
            == snapshot
        )


def test_a_value_that_does_not_open_is_reported_by_place_and_the_rest_continue(
    vault: Vault, operator_db: Any, provider: Any, owner_engine: sa.Engine
) -> None:
    expected = populate(vault, "t_a")
    populate(vault, "t_b")
    broken = next(config_id for kind, config_id in expected if kind == "cred")
    with owner_engine.begin() as connection:
        # Move t_a's sealed credentials from another row into this one: it will not open here.
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.email_provider_configs c SET encrypted_credentials = o.encrypted_credentials "
                "FROM dripiq_app.email_provider_configs o WHERE c.id = :id AND o.tenant_id = 't_a' AND o.id <> :id "
                "AND o.type = 'smtp'"
            ),
            {"id": broken},
        )
    report = rotate_data_keys(
        operator_db, fresh_keyring(provider), ["t_a", "t_b"], DekRotationOptions(batch_size=2)
    )
    assert not report.ok
    assert [(u.tenant_id, u.column, u.row, u.error) for u in report.unopenable] == [
        ("t_a", "email_provider_configs.encrypted_credentials", broken, "DecryptionError")
    ]
    outcomes = {t.tenant_id: (t.outcome, t.remaining) for t in report.tenants}
    assert outcomes == {"t_a": ("incomplete", 1), "t_b": ("rotated", 0)}
    # The old key stays readable (draining) while a value still names it.
    assert key_states(owner_engine, "t_a") == {1: "draining", 2: "active"}
    assert "secret" not in repr(report)


# A batch's values go back in chunks, each chunk's UPDATE running while the next is
# re-sealed: with chunks of 2, a batch of 5 is three UPDATEs on the writer thread.
@pytest.mark.parametrize("chunk", [dek.RESEAL_CHUNK, 2])
def test_concurrent_writers_during_rotation_lose_no_update(
    vault: Vault,
    operator_db: Any,
    provider: Any,
    owner_engine: sa.Engine,
    chunk: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dek, "RESEAL_CHUNK", chunk)
    configs = [
        vault.create_config(
            "t_a",
            type="smtp",
            name=f"c{n}",
            config=dict(SMTP_CONFIG),
            credentials={"password": "start"},
        ).id
        for n in range(20)
    ]
    last_written: dict[str, str] = {}
    stop = threading.Event()
    errors: list[BaseException] = []
    writers = 3

    def writer(worker: int) -> None:
        # Each writer owns its own configs, so "the last write" of a config is exact.
        mine = configs[worker::writers]
        n = 0
        try:
            while not stop.is_set():
                config_id = mine[n % len(mine)]
                value = f"w{worker}-{n}"
                vault.store_credentials("t_a", config_id, {"password": value})
                last_written[config_id] = value
                n += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            report = rotate_data_keys(
                operator_db, fresh_keyring(provider), ["t_a"], DekRotationOptions(batch_size=5)
            )
            assert report.ok, report
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors
    vault.keyring.cache.clear()
    for config_id in configs:
        creds: Any = vault.load_credentials("t_a", config_id)
        assert creds.password.get_secret_value() == last_written.get(config_id, "start")
    # The last rotation may have raced the writers; a final run leaves one key.
    final = rotate_data_keys(operator_db, fresh_keyring(provider), ["t_a"])
    assert final.ok
    assert set(sealed_versions(owner_engine, "t_a")) == {final.tenants[0].to_version}


SMTP_CONFIG = {
    "host": "smtp.example.com",
    "port": 587,
    "secure": False,
    "auth_type": "login",
    "user": "u",
}


def test_shredded_tenant_values_raise_key_destroyed_and_other_tenants_are_untouched(
    vault: Vault, operator_db: Any, provider: Any, owner_engine: sa.Engine
) -> None:
    expected_a = populate(vault, "t_a")
    expected_b = populate(vault, "t_b")
    rotate_data_keys(operator_db, fresh_keyring(provider), ["t_a"])
    values = sum(sealed_versions(owner_engine, "t_a").values())
    report = shred_tenant(operator_db, "t_a", cache=vault.keyring.cache)
    assert (report.destroyed_versions, report.sealed_values) == ([1, 2], values)
    assert key_states(owner_engine, "t_a") == {1: "destroyed", 2: "destroyed"}
    config_id = next(c for kind, c in expected_a if kind == "cred")
    with pytest.raises(KeyDestroyedError):
        vault.load_credentials("t_a", config_id)
    graph_id = next(c for kind, c in expected_a if kind == "access")
    with pytest.raises(KeyDestroyedError):
        vault.load_oauth_token("t_a", graph_id)
    # The configs remain as records.
    assert len(vault.list_active_configs("t_a")) == len([k for k in expected_a if k[0] == "cred"])
    assert open_everything(vault, "t_b") == expected_b
    # A rotation afterwards skips the shredded tenant (no live key) and is clean.
    after = rotate_data_keys(operator_db, fresh_keyring(provider), None)
    assert after.ok
    assert [t.tenant_id for t in after.tenants] == ["t_b"]
    # New secrets of the shredded tenant get a fresh key.
    vault.store_credentials("t_a", config_id, {"password": "after-shred"})
    creds: Any = vault.load_credentials("t_a", config_id)
    assert creds.password.get_secret_value() == "after-shred"
    assert key_states(owner_engine, "t_a")[3] == "active"
    again = rotate_data_keys(operator_db, fresh_keyring(provider), ["t_a"])
    assert again.ok, again


@pytest.mark.parametrize("chunk", [dek.RESEAL_CHUNK, 2])
def test_a_database_error_in_a_worker_stops_the_run_with_its_reason_and_a_rerun_finishes(
    vault: Vault,
    operator_db: Any,
    provider: Any,
    owner_engine: sa.Engine,
    chunk: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dek, "RESEAL_CHUNK", chunk)
    expected = populate(vault, "t_a")
    with owner_engine.begin() as connection:
        connection.exec_driver_sql(
            "REVOKE UPDATE ON dripiq_app.email_provider_config_versions FROM tenantvault_migrator"
        )
    try:
        report = rotate_data_keys(operator_db, fresh_keyring(provider), ["t_a"])
    finally:
        with owner_engine.begin() as connection:
            connection.exec_driver_sql(
                "GRANT UPDATE ON dripiq_app.email_provider_config_versions TO tenantvault_migrator"
            )
    assert not report.ok
    assert report.stopped == "tenant t_a: InsufficientPrivilege; nothing half-written"
    vault.keyring.cache.clear()
    assert open_everything(vault, "t_a") == expected
    again = rotate_data_keys(operator_db, fresh_keyring(provider), ["t_a"])
    assert again.ok
    assert [t.outcome for t in again.tenants] == ["resumed"]
    assert set(sealed_versions(owner_engine, "t_a")) == {2}


def test_a_tenant_another_process_is_rotating_is_reported_busy_and_the_rest_proceed(
    vault: Vault, operator_db: Any, provider: Any, owner_engine: sa.Engine, migrated: Any
) -> None:
    from tenantvault.db.operator import DEK_ROTATION_CLAIM, OperatorDatabase

    populate(vault, "t_a")
    populate(vault, "t_b")
    other_process = OperatorDatabase.from_settings(migrated)  # its own connections
    try:
        with other_process.claim(DEK_ROTATION_CLAIM, "t_a") as claimed:
            assert claimed
            report = rotate_data_keys(
                operator_db, fresh_keyring(provider), None, DekRotationOptions(workers=2)
            )
    finally:
        other_process.dispose()
    assert {t.tenant_id: t.outcome for t in report.tenants} == {"t_a": "busy", "t_b": "rotated"}
    assert not report.ok
    assert key_states(owner_engine, "t_a") == {1: "active"}
    after = rotate_data_keys(operator_db, fresh_keyring(provider), ["t_a"])
    assert after.ok
    assert [t.outcome for t in after.tenants] == ["rotated"]


def test_a_shred_during_a_rotation_is_refused_and_a_rotation_never_reseals_under_a_destroyed_key(
    vault: Vault, operator_db: Any, provider: Any, owner_engine: sa.Engine
) -> None:
    # The interleaving made deterministic: the rotation pauses after its first batch.
    for n in range(6):
        vault.create_config(
            "t_a", type="smtp", name=f"c{n}", config=SMTP_CONFIG, credentials={"password": "old"}
        )
    paused, resume = threading.Event(), threading.Event()

    def pause_after_first_batch(event: Any) -> None:
        if event.column is not None and not paused.is_set():
            paused.set()
            assert resume.wait(30)

    reports: list[Any] = []
    rotation = threading.Thread(
        target=lambda: reports.append(
            rotate_data_keys(
                operator_db,
                fresh_keyring(provider),
                ["t_a"],
                DekRotationOptions(batch_size=2),
                on_progress=pause_after_first_batch,
            )
        )
    )
    rotation.start()
    try:
        assert paused.wait(30)
        # 1. The operator's shred waits for no rotation: it refuses, destroying nothing.
        with pytest.raises(RotationError, match="being rotated"):
            shred_tenant(operator_db, "t_a")
        assert set(key_states(owner_engine, "t_a").values()) == {"draining", "active"}
        # 2. Keys destroyed behind the rotation's back (by hand, as the owner), then the
        #    application stores a new secret under a fresh key: the rotation must not
        #    re-seal it under the destroyed key it was rotating to.
        with owner_engine.begin() as connection:
            connection.execute(
                sa.text(
                    "UPDATE dripiq_app.tenant_data_keys SET state = 'destroyed', "
                    "wrapped_key = NULL WHERE tenant_id = 't_a'"
                )
            )
        vault.keyring.cache.clear()
        fresh = vault.create_config(
            "t_a", type="smtp", name="after", config=SMTP_CONFIG, credentials={"password": "new"}
        )
    finally:
        resume.set()
        rotation.join(60)
    [report] = reports
    assert [t.outcome for t in report.tenants] == ["keys changed"]
    assert not report.ok
    vault.keyring.cache.clear()
    creds: Any = vault.load_credentials("t_a", fresh.id)
    assert creds.password.get_secret_value() == "new"


def test_a_value_that_is_not_sealed_is_refused_and_one_already_there_halts_nothing(
    vault: Vault, operator_db: Any, provider: Any, owner_engine: sa.Engine
) -> None:
    bad = vault.create_config(
        "t_a", type="smtp", name="bad", config=SMTP_CONFIG, credentials={"password": "x"}
    )
    populate(vault, "t_b")
    garbage = "UPDATE dripiq_app.email_provider_configs SET encrypted_credentials = 'garbage' WHERE id = :id"
    # The CHECK refuses plaintext or garbage in a sealed column, even from the owner.
    with (
        pytest.raises(sa.exc.IntegrityError, match="encrypted_credentials_sealed"),
        owner_engine.begin() as connection,
    ):
        connection.execute(sa.text(garbage), {"id": bad.id})
    # One that got in before the CHECK existed: reported by row, every other tenant rotates.
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "ALTER TABLE dripiq_app.email_provider_configs "
                "DROP CONSTRAINT ck_email_provider_configs_encrypted_credentials_sealed"
            )
        )
        connection.execute(sa.text(garbage), {"id": bad.id})
    status = key_status(operator_db, provider)
    assert (status.malformed_values, status.legacy_values) == (1, 0)
    report = rotate_data_keys(operator_db, fresh_keyring(provider), None)
    outcomes = {t.tenant_id: t.outcome for t in report.tenants}
    assert outcomes == {"t_a": "incomplete", "t_b": "rotated"}
    assert [(u.tenant_id, u.column, u.row) for u in report.unopenable] == [
        ("t_a", "email_provider_configs.encrypted_credentials", bad.id)
    ]
    assert report.stopped is None
