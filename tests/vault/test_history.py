"""Config versioning and credential rotation: history grows per change, rollback writes a
new version, expected_version conflicts are caught under real concurrency, retention
bounds the kept secrets. Real PostgreSQL as the application role, real OpenBao."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from tenantvault import ConcurrentModification, InvalidInputError, NotFoundError, Vault
from tenantvault.db.models import ConfigChange
from tenantvault.settings import Settings
from tests.conftest import CountingProvider

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}


def _password(creds: Any) -> str:
    return str(creds.password.get_secret_value())


def test_every_change_is_a_kept_version_with_actor_reason_and_its_credentials(vault: Vault) -> None:
    cfg = vault.create_config(
        "t_a",
        type="smtp",
        name="Relay",
        config=SMTP,
        credentials={"password": "one"},
        actor="user:1",
        reason="setup",
    )
    assert cfg.version == 1
    assert (
        vault.store_credentials(
            "t_a", cfg.id, {"password": "two"}, actor="user:2", reason="rotated"
        )
        == 2
    )
    renamed = vault.update_config(
        "t_a", cfg.id, name="Relay B", config={**SMTP, "port": 2525}, actor="user:3"
    )
    assert renamed.version == 3
    history = vault.list_config_versions("t_a", cfg.id)
    assert [
        (v.version, v.change, v.name, v.actor, v.reason, v.has_credentials) for v in history
    ] == [
        (1, ConfigChange.CREATED, "Relay", "user:1", "setup", True),
        (2, ConfigChange.CREDENTIALS, "Relay", "user:2", "rotated", True),
        (3, ConfigChange.UPDATED, "Relay B", "user:3", None, True),
    ]
    assert [v.config.port for v in history] == [587, 587, 2525]  # type: ignore[union-attr]
    assert all(v.credentials is None for v in history)  # not opened unless asked
    opened = [
        _password(vault.get_config_version("t_a", cfg.id, n, with_credentials=True).credentials)
        for n in (1, 2, 3)
    ]
    assert opened == ["one", "two", "two"]
    assert _password(vault.load_credentials("t_a", cfg.id)) == "two"
    # Asking for no change writes no version.
    assert vault.update_config("t_a", cfg.id).version == 3


def test_rollback_restores_an_old_version_as_a_new_one(vault: Vault) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": "one"}
    )
    vault.update_config(
        "t_a",
        cfg.id,
        name="Other",
        config={**SMTP, "host": "mx.example.com"},
        credentials={"password": "two"},
    )
    rolled = vault.rollback_config("t_a", cfg.id, 1, actor="user:9", expected_version=2)
    assert (rolled.version, rolled.name, rolled.config.host) == (3, "Relay", "smtp.example.com")  # type: ignore[union-attr]
    assert _password(vault.load_credentials("t_a", cfg.id)) == "one"
    last = vault.list_config_versions("t_a", cfg.id)[-1]
    assert (last.version, last.change, last.actor, last.reason) == (
        3,
        ConfigChange.ROLLBACK,
        "user:9",
        "rollback to version 1",
    )
    with pytest.raises(NotFoundError, match="no version 7"):
        vault.rollback_config("t_a", cfg.id, 7)


def test_expected_version_mismatch_is_refused_and_writes_nothing(
    vault: Vault, owner_engine: sa.Engine
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": "one"}
    )
    vault.store_credentials("t_a", cfg.id, {"password": "two"})
    with pytest.raises(ConcurrentModification, match="at version 2, not 1"):
        vault.store_credentials("t_a", cfg.id, {"password": "stale"}, expected_version=1)
    with pytest.raises(ConcurrentModification):
        vault.update_config("t_a", cfg.id, name="X", expected_version=1)
    with pytest.raises(ConcurrentModification):
        vault.rollback_config("t_a", cfg.id, 1, expected_version=1)
    assert _password(vault.load_credentials("t_a", cfg.id)) == "two"
    assert len(vault.list_config_versions("t_a", cfg.id)) == 2


def test_concurrent_writers_with_the_same_expected_version_exactly_one_wins(vault: Vault) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": "start"}
    )
    writers = 8
    barrier = threading.Barrier(writers)
    outcomes: list[str] = []

    def write(n: int) -> None:
        barrier.wait()
        try:
            vault.store_credentials("t_a", cfg.id, {"password": f"p{n}"}, expected_version=1)
            outcomes.append(f"p{n}")
        except ConcurrentModification:
            outcomes.append("conflict")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if o != "conflict"]
    assert len(winners) == 1
    assert outcomes.count("conflict") == writers - 1
    assert _password(vault.load_credentials("t_a", cfg.id)) == winners[0]
    assert [v.version for v in vault.list_config_versions("t_a", cfg.id)] == [1, 2]


def test_retention_keeps_only_the_newest_versions_secrets(
    app_settings: Settings, provider: CountingProvider
) -> None:
    vault = Vault.from_settings(
        app_settings.model_copy(update={"config_history_credentials_kept": 2}),
        key_provider=provider,
    )
    try:
        cfg = vault.create_config(
            "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": "p1"}
        )
        for n in range(2, 6):
            vault.store_credentials("t_a", cfg.id, {"password": f"p{n}"})
        history = vault.list_config_versions("t_a", cfg.id)
        assert [(v.version, v.has_credentials) for v in history] == [
            (1, False),
            (2, False),
            (3, False),
            (4, True),
            (5, True),
        ]
        with pytest.raises(InvalidInputError, match="credentials of version 2 are no longer kept"):
            vault.rollback_config("t_a", cfg.id, 2)
        assert vault.get_config("t_a", cfg.id).version == 5
        vault.rollback_config("t_a", cfg.id, 4)
        assert _password(vault.load_credentials("t_a", cfg.id)) == "p4"
    finally:
        vault.dispose()


def test_actor_and_reason_are_validated_without_echoing_them(vault: Vault) -> None:
    with pytest.raises(InvalidInputError, match="actor: must be") as refused:
        vault.create_config(
            "t_a",
            type="smtp",
            name="R",
            config=SMTP,
            credentials={"password": "p"},
            actor="x" * 501,
        )
    assert "xxxx" not in str(refused.value)
    with pytest.raises(InvalidInputError, match="reason: must be printable"):
        vault.create_config(
            "t_a",
            type="smtp",
            name="R",
            config=SMTP,
            credentials={"password": "p"},
            reason="bad\x00reason",
        )


def test_history_is_isolated_per_tenant_and_the_app_role_cannot_delete_it(
    vault: Vault, app_url: str
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="R", config=SMTP, credentials={"password": "s"}
    )
    with pytest.raises(NotFoundError):
        vault.list_config_versions("t_b", cfg.id)
    with psycopg.connect(app_url) as connection:
        connection.execute("SELECT set_config('tenantvault.tenant_id', 't_b', true)")
        assert connection.execute(
            "SELECT count(*) FROM dripiq_app.email_provider_config_versions"
        ).fetchone() == (0,)
        connection.execute("SELECT set_config('tenantvault.tenant_id', 't_a', true)")
        assert connection.execute(
            "SELECT count(*) FROM dripiq_app.email_provider_config_versions"
        ).fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("DELETE FROM dripiq_app.email_provider_config_versions")


def test_a_history_secret_is_bound_to_its_version(vault: Vault, owner_engine: sa.Engine) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="R", config=SMTP, credentials={"password": "one"}
    )
    vault.store_credentials("t_a", cfg.id, {"password": "two"})
    with owner_engine.begin() as connection:
        # Swap version 2's sealed secret into version 1: it must not open there.
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.email_provider_config_versions v SET encrypted_credentials = w.encrypted_credentials "
                "FROM dripiq_app.email_provider_config_versions w "
                "WHERE v.config_id = :c AND v.version = 1 AND w.config_id = :c AND w.version = 2"
            ),
            {"c": cfg.id},
        )
    from tenantvault import DecryptionError

    with pytest.raises(DecryptionError):
        vault.get_config_version("t_a", cfg.id, 1, with_credentials=True)


def test_a_rename_onto_a_taken_name_is_refused_and_writes_no_version(vault: Vault) -> None:
    vault.create_config(
        "t_a", type="smtp", name="Taken", config=SMTP, credentials={"password": "p"}
    )
    cfg = vault.create_config(
        "t_a", type="smtp", name="Mine", config=SMTP, credentials={"password": "p"}
    )
    with pytest.raises(InvalidInputError, match="already has a live config named 'Taken'"):
        vault.update_config("t_a", cfg.id, name="Taken")
    with pytest.raises(InvalidInputError, match="already has a live config named 'Taken'"):
        vault.update_config("t_a", cfg.id, name="Taken", credentials={"password": "q"})
    assert vault.get_config("t_a", cfg.id).version == 1
    assert [v.version for v in vault.list_config_versions("t_a", cfg.id)] == [1]
    assert _password(vault.load_credentials("t_a", cfg.id)) == "p"
