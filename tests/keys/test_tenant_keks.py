"""A tenant's own KEK (a customer-managed key) against the real OpenBao and PostgreSQL:
``tenant-key set/show/unset`` as an operator runs them, the application's loads under
it, revocation (the key's policy taken away, the key deleted) failing only that
tenant, and a move killed midway and run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import hvac
import pytest
import sqlalchemy as sa

from tenantvault import TenantKeyUnavailable, Vault
from tenantvault.errors import DecryptionError
from tenantvault.kms.factory import kek_resolver
from tenantvault.kms.keks import Keks
from tenantvault.settings import Settings, load_settings
from tests.cli.process import SRC, failed_line, run_cli
from tests.conftest import AWS_TEST_ENVIRONMENT, Services, child_environment, transit_provider
from tests.rotation_support import open_everything, populate

DEFAULT_REF = "transit:tenantvault-tests"


@pytest.fixture
def root(services: Services) -> hvac.Client:
    return hvac.Client(url=services.vault_addr, token=services.vault_token, timeout=5)


def _customer_key(root: hvac.Client, name: str, *, derived: bool = True) -> str:
    """A transit key as a customer's KMS admin makes it; returns its reference."""
    root.secrets.transit.create_key(name=name, derived=derived, key_type="aes256-gcm96")
    return f"transit:{name}"


def _delete_key(root: hvac.Client, name: str) -> None:
    root.secrets.transit.update_key_configuration(name=name, deletion_allowed=True)
    root.secrets.transit.delete_key(name=name)


def _refs(owner_engine: sa.Engine, tenant: str) -> dict[int, str]:
    with owner_engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT version, kek_ref FROM dripiq_app.tenant_data_keys "
                "WHERE tenant_id = :t AND state <> 'destroyed'"
            ),
            {"t": tenant},
        )
        return {version: ref for version, ref in rows}


def _active_wrapped(owner_engine: sa.Engine, tenant: str) -> str:
    with owner_engine.connect() as connection:
        wrapped: str = connection.execute(
            sa.text(
                "SELECT wrapped_key FROM dripiq_app.tenant_data_keys "
                "WHERE tenant_id = :t AND state = 'active'"
            ),
            {"t": tenant},
        ).scalar_one()
    return wrapped


def _app_vault(app_settings: Settings, token: str | None = None, **extra: Any) -> Vault:
    """A fresh application process's vault: cold cache, the tests' default KEK."""
    settings = load_settings(
        database_url=app_settings.database_url.get_secret_value(),
        VAULT_ADDR=str(app_settings.vault_addr),
        VAULT_TOKEN=token or app_settings.vault_token.get_secret_value(),  # type: ignore[union-attr]
        transit_key="tenantvault-tests",
        **extra,
    )
    return Vault.from_settings(settings)


@pytest.fixture
def operator_env(migrated: Settings, services: Services) -> dict[str, str]:
    return child_environment(migrated, services)


def _tenant_key(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("tenant-key", *args, **env)


def test_set_moves_the_tenants_keys_and_new_keys_follow_while_others_stay(
    vault: Vault,
    owner_engine: sa.Engine,
    root: hvac.Client,
    operator_env: dict[str, str],
    app_settings: Settings,
) -> None:
    expected = populate(vault, "t_a", configs=1)
    other = populate(vault, "t_b", configs=1)
    ref = _customer_key(root, "customer-a")
    assert set(_refs(owner_engine, "t_a").values()) == {DEFAULT_REF}

    done = _tenant_key(operator_env, "set", "--tenant", "t_a", "--key", ref, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["kek_ref"], summary["moved"], summary["left"]) == (ref, 1, 0)
    assert set(_refs(owner_engine, "t_a").values()) == {ref}
    assert set(_refs(owner_engine, "t_b").values()) == {DEFAULT_REF}

    assert vault.tenant_key("t_a") == ref
    assert vault.tenant_key("t_b") == DEFAULT_REF
    assert open_everything(vault, "t_a") == expected  # cached before: the wrapping changed
    assert open_everything(vault, "t_b") == other
    # A DEK rotation's new key of t_a is wrapped by the tenant's KEK too.
    rotated = run_cli("rotate-keys", "dek", "--tenant", "t_a", **operator_env)
    assert rotated.returncode == 0, rotated.stderr
    assert set(_refs(owner_engine, "t_a").values()) == {ref}

    # The customer rotates their key; the operator rewraps the tenant's keys to it.
    root.secrets.transit.rotate_key(name="customer-a")
    caught_up = run_cli("rotate-keys", "kek", "--key", ref, "--no-rotate", **operator_env)
    assert caught_up.returncode == 0, caught_up.stderr
    with owner_engine.connect() as connection:
        versions = connection.execute(
            sa.text(
                "SELECT DISTINCT kek_version FROM dripiq_app.tenant_data_keys "
                "WHERE tenant_id = 't_a'"
            )
        ).scalars()
        assert set(versions) == {2}
    cold = _app_vault(app_settings)
    try:
        assert open_everything(cold, "t_a") == expected
    finally:
        cold.dispose()

    shown = _tenant_key(operator_env, "show", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [(r["tenant_id"], r["kek_ref"], r["own"], r["usable"]) for r in rows] == [
        ("t_a", ref, True, True)
    ]

    back = _tenant_key(operator_env, "unset", "--tenant", "t_a")
    assert back.returncode == 0, back.stderr
    assert set(_refs(owner_engine, "t_a").values()) == {DEFAULT_REF}
    assert vault.tenant_key("t_a") == DEFAULT_REF
    assert open_everything(vault, "t_a") == expected


def test_a_key_is_checked_before_anything_is_written(
    owner_engine: sa.Engine, root: hvac.Client, operator_env: dict[str, str], app_settings: Any
) -> None:
    missing = _tenant_key(operator_env, "set", "--tenant", "t_a", "--key", "transit:nope")
    assert "transit/nope does not exist" in failed_line(missing, 1)
    _customer_key(root, "plain-a", derived=False)
    flat = _tenant_key(operator_env, "set", "--tenant", "t_a", "--key", "transit:plain-a")
    assert "derived" in failed_line(flat, 1)
    garbage = _tenant_key(operator_env, "set", "--tenant", "t_a", "--key", "no reference")
    assert "key must be a key reference" in failed_line(garbage, 2)
    unknown = _tenant_key(operator_env, "set", "--tenant", "t_a", "--key", "gcpkms:k")
    assert "no key provider for 'gcpkms:'" in failed_line(unknown, 1)
    stranger = _tenant_key(operator_env, "set", "--tenant", "t_nobody", "--key", "transit:x")
    assert "t_nobody" in failed_line(stranger, 2)
    with owner_engine.connect() as connection:
        kept = connection.execute(sa.text("SELECT count(*) FROM dripiq_app.tenant_keks"))
        assert kept.scalar_one() == 0


def test_a_wrapped_key_moved_to_another_tenant_or_kek_does_not_unwrap(
    vault: Vault,
    owner_engine: sa.Engine,
    root: hvac.Client,
    operator_env: dict[str, str],
    services: Services,
    app_settings: Settings,
) -> None:
    populate(vault, "t_a", configs=1)
    populate(vault, "t_b", configs=1)
    ref = _customer_key(root, "customer-move")
    assert _tenant_key(operator_env, "set", "--tenant", "t_a", "--key", ref).returncode == 0
    wrapped = _active_wrapped(owner_engine, "t_a")
    customer = transit_provider(services, key_name="customer-move")
    assert len(customer.unwrap("t_a", wrapped)) == 32
    with pytest.raises(DecryptionError):
        customer.unwrap("t_b", wrapped)  # another tenant's context
    with pytest.raises(DecryptionError):
        transit_provider(services).unwrap("t_a", wrapped)  # another KEK
    # In the database: t_a's wrapped key and its reference put on t_b's key row.
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.tenant_data_keys SET wrapped_key = :w, kek_ref = :r "
                "WHERE tenant_id = 't_b' AND state = 'active'"
            ),
            {"w": wrapped, "r": ref},
        )
    cold = _app_vault(app_settings)
    try:
        config = cold.list_active_configs("t_b")[0]
        with pytest.raises(DecryptionError):
            cold.load_credentials("t_b", config.id)
    finally:
        cold.dispose()


@pytest.fixture
def app_token(root: hvac.Client) -> Iterator[tuple[str, str]]:
    """A token as the application holds it: the tests' default KEK and customer-p's,
    generate and decrypt only. Yields (token, policy name)."""
    policy = "tenantvault-app-customer"
    root.sys.create_or_update_policy(policy, _policy("customer-p"))
    token = root.auth.token.create(policies=[policy], ttl="1h")["auth"]["client_token"]
    yield token, policy
    root.sys.delete_policy(policy)


def _policy(*customer_keys: str) -> str:
    keys = ("tenantvault-tests", *customer_keys)
    return "\n".join(
        f'path "transit/{op}/{key}" {{ capabilities = ["update"] }}'
        for key in keys
        for op in ("datakey/plaintext", "decrypt")
    )


def test_a_revoked_tenant_key_fails_only_its_tenant_and_opens_again_when_restored(
    vault: Vault,
    owner_engine: sa.Engine,
    root: hvac.Client,
    operator_env: dict[str, str],
    app_settings: Settings,
    app_token: tuple[str, str],
) -> None:
    expected = populate(vault, "t_a", configs=1)
    other = populate(vault, "t_b", configs=1)
    ref = _customer_key(root, "customer-p")
    moved = _tenant_key(
        operator_env, "set", "--tenant", "t_a", "--key", ref, "--cache-max-age", "1"
    )
    assert moved.returncode == 0, moved.stderr
    token, policy = app_token
    app = _app_vault(app_settings, token, transit_backoff_initial_seconds=0.2)
    try:
        assert open_everything(app, "t_a") == expected
        # The customer takes the application's access away.
        root.sys.create_or_update_policy(policy, _policy())
        time.sleep(1.2)  # the tenant's revocation delay (--cache-max-age 1)
        config = app.list_active_configs("t_a")[0]
        with pytest.raises(TenantKeyUnavailable) as refused:
            app.load_credentials("t_a", config.id)
        assert refused.value.tenant_id == "t_a"
        assert "tenant t_a" in str(refused.value)
        assert ref in str(refused.value)
        with pytest.raises(TenantKeyUnavailable):  # the tenant's gate: no new request
            app.open_config("t_a", config.id)
        # The other tenant is untouched: cached, and uncached in a cold process.
        assert open_everything(app, "t_b") == other
        cold = _app_vault(app_settings, token)
        try:
            assert open_everything(cold, "t_b") == other
            with pytest.raises(TenantKeyUnavailable):
                cold.load_credentials("t_a", config.id)
        finally:
            cold.dispose()
        # Access comes back: everything opens again, nothing lost.
        root.sys.create_or_update_policy(policy, _policy("customer-p"))
        time.sleep(0.3)  # past the tenant gate's window (0.1 to 0.2 s after one failure)
        assert open_everything(app, "t_a") == expected
    finally:
        app.dispose()


def test_a_deleted_tenant_key_shows_unusable_and_rotation_skips_only_that_tenant(
    vault: Vault,
    owner_engine: sa.Engine,
    root: hvac.Client,
    operator_env: dict[str, str],
    app_settings: Settings,
) -> None:
    populate(vault, "t_a", configs=1)
    other = populate(vault, "t_b", configs=1)
    ref = _customer_key(root, "customer-d")
    assert _tenant_key(operator_env, "set", "--tenant", "t_a", "--key", ref).returncode == 0
    _delete_key(root, "customer-d")

    cold = _app_vault(app_settings)
    try:
        config = next(c for c in cold.list_active_configs("t_a") if c.type == "smtp")
        with pytest.raises(TenantKeyUnavailable, match="t_a"):
            cold.load_credentials("t_a", config.id)
        with pytest.raises(TenantKeyUnavailable, match="t_a"):
            cold.store_credentials("t_a", config.id, {"password": "new"})
        assert open_everything(cold, "t_b") == other
        warmed = cold.warm(["t_a", "t_b"])
        assert [f.tenant_id for f in warmed.failed] == ["t_a"]
        assert warmed.stopped is None
    finally:
        cold.dispose()

    shown = _tenant_key(operator_env, "show", "--tenant", "t_a", "--tenant", "t_b")
    assert shown.returncode == 3, shown.stdout + shown.stderr
    assert "tenant t_a: KEK transit:customer-d (its own), NOT USABLE" in shown.stdout
    assert f"tenant t_b: KEK {DEFAULT_REF} (the deployment's), usable" in shown.stdout

    health = run_cli("status", **operator_env)
    assert health.returncode == 3, health.stdout + health.stderr
    assert "tenant KEK    NOT USABLE: tenant t_a: KEK transit:customer-d:" in health.stdout

    rotated = run_cli("rotate-keys", "dek", "--all", **operator_env)
    assert rotated.returncode == 4, rotated.stdout + rotated.stderr
    assert "tenant t_a: kek unavailable: the KEK transit:customer-d of tenant t_a" in (
        rotated.stdout
    )
    assert "tenant t_b: rotated" in rotated.stdout
    assert "Traceback" not in rotated.stdout + rotated.stderr


def test_a_move_killed_midway_finishes_when_run_again_with_nothing_lost(
    vault: Vault,
    owner_engine: sa.Engine,
    root: hvac.Client,
    operator_env: dict[str, str],
    app_settings: Settings,
) -> None:
    expected = populate(vault, "t_a", configs=2)
    for _ in range(4):  # five data keys: the old ones retired, each still a row to move
        assert run_cli("rotate-keys", "dek", "--tenant", "t_a", **operator_env).returncode == 0
    assert len(_refs(owner_engine, "t_a")) == 5
    ref = _customer_key(root, "customer-k")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC)}
    env.update(operator_env)
    command = [sys.executable, "-m", "tenantvault.cli", "tenant-key", "set", "--tenant", "t_a"]
    command += ["--key", ref, "--batch-size", "1", "--json"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        assert process.stdout is not None
        first = process.stdout.readline()  # one batch committed
        assert json.loads(first)["moved"] == 1, first
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    refs = _refs(owner_engine, "t_a")
    assert set(refs.values()) == {ref, DEFAULT_REF}, refs
    cold = _app_vault(app_settings)
    try:
        assert open_everything(cold, "t_a") == expected  # half moved: all still opens
        again = _tenant_key(operator_env, "set", "--tenant", "t_a", "--key", ref, "--json")
        assert again.returncode == 0, again.stderr
        summary = json.loads(again.stdout.strip().splitlines()[-1])
        assert summary["left"] == 0
        assert summary["moved"] >= 1
        assert set(_refs(owner_engine, "t_a").values()) == {ref}
        assert open_everything(cold, "t_a") == expected
    finally:
        cold.dispose()


def test_the_application_keyring_resolves_tenant_keks_from_its_settings(
    app_settings: Settings, services: Services, root: hvac.Client
) -> None:
    ref = _customer_key(root, "customer-r")
    keks = Keks(transit_provider(services), kek_resolver(app_settings, lambda kek: kek))
    assert keks.provider(ref) is keks.provider(ref)  # one provider per reference
    assert keks.provider(ref).ref == ref
    keks.provider(ref).check_usable()


def test_a_tenant_kek_in_aws_kms_beside_the_deployments_transit_key(
    vault: Vault,
    owner_engine: sa.Engine,
    operator_env: dict[str, str],
    app_settings: Settings,
    aws_kms: str,
) -> None:
    """Against moto's server: a tenant moved from transit to its own AWS KMS key (and
    back), its keys unwrapped by AWS with the tenant in the encryption context."""
    import boto3

    key_id = boto3.client("kms").create_key()["KeyMetadata"]["KeyId"]
    ref = f"awskms:{key_id}"
    expected = populate(vault, "t_a", configs=1)
    env = {**operator_env, **AWS_TEST_ENVIRONMENT, "AWS_ENDPOINT_URL": aws_kms}
    env["AWS_CONFIG_FILE"] = os.devnull

    moved = _tenant_key(env, "set", "--tenant", "t_a", "--key", ref, "--json")
    assert moved.returncode == 0, moved.stderr
    assert set(_refs(owner_engine, "t_a").values()) == {ref}
    cold = _app_vault(app_settings)
    try:
        assert cold.tenant_key("t_a") == ref
        assert open_everything(cold, "t_a") == expected
    finally:
        cold.dispose()
    wrapped = _active_wrapped(owner_engine, "t_a")
    aws = kek_resolver(app_settings, lambda kek: kek)(ref)
    assert len(aws.unwrap("t_a", wrapped)) == 32
    with pytest.raises(DecryptionError):
        aws.unwrap("t_b", wrapped)  # the encryption context names another tenant

    back = _tenant_key(env, "unset", "--tenant", "t_a")
    assert back.returncode == 0, back.stderr
    assert set(_refs(owner_engine, "t_a").values()) == {DEFAULT_REF}
    assert open_everything(vault, "t_a") == expected
