"""A DEK rotation killed with SIGKILL anywhere leaves every value readable, and a rerun
finishes. The rotation runs in a child process against the same PostgreSQL and
OpenBao; the child kills itself at the chosen point (or the test kills it after a
chosen delay), so the crash is a real one: no cleanup, no rollback hook, no unlock."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import Vault
from tenantvault.rotation.dek import rotate_data_keys
from tenantvault.rotation.options import DekRotationOptions
from tenantvault.settings import Settings
from tests.conftest import Services, child_environment, fresh_keyring
from tests.rotation_support import (
    add_tenants,
    key_states,
    open_everything,
    populate,
    sealed_versions,
)

TENANTS = ["t_a", "t_b", "t_c"]

# The child: a rotation of every tenant that SIGKILLs itself at one point.
#   batches:N  after N committed batches (N=0: right after the first tenant's key switch)
#   seals:N    inside a batch: after sealing N values, before that batch commits
#   switch     after the new key came from Vault, before it was stored
#   retire     inside the retire transaction, holding the tenant's key lock
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from tenantvault.keys import keyring as keyring_module
    from tenantvault.rotation import dek as dekrotation
    from tenantvault.keys.cache import DataKeyCache
    from tenantvault.kms.factory import key_provider_from_settings
    from tenantvault.db.operator import OperatorDatabase
    from tenantvault.keys import store
    from tenantvault.rotation.options import DekRotationOptions
    from tenantvault.settings import load_settings

    point, _, count = sys.argv[1].partition(":")
    limit = int(count or 0)
    seen = {"n": 0}

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def tick() -> None:
        seen["n"] += 1
        if seen["n"] >= limit:
            die()

    settings = load_settings()
    provider = key_provider_from_settings(settings)
    ring = keyring_module.Keyring(provider, DataKeyCache(max_age_seconds=60, max_entries=99, max_uses=10**9))
    if point == "seals":
        # Every re-seal, one at a time or a batch's many, goes through the Resealer.
        from tenantvault.crypto import envelope
        real_reseal = envelope.Resealer.reseal
        def reseal(*args, **kwargs):
            tick()
            return real_reseal(*args, **kwargs)
        envelope.Resealer.reseal = reseal
    if point == "switch":
        real_generate = provider.generate_data_key
        def generate(tenant_id):
            result = real_generate(tenant_id)
            die()
            return result
        provider.generate_data_key = generate
    if point == "retire":
        def retire_then_die(self, tenant_id, *args):
            with self.db.transaction() as connection:
                store.lock_tenant_keys(connection, tenant_id, exclusive=True)
                die()
        dekrotation.DekRotation._retire = retire_then_die

    def progress(event):
        if point == "batches" and event.column is not None:
            tick()

    if point == "batches" and limit == 0:
        real_switch = keyring_module.Keyring.switch
        def switch_then_die(self, *args, **kwargs):
            real_switch(self, *args, **kwargs)
            die()
        keyring_module.Keyring.switch = switch_then_die

    db = OperatorDatabase.from_settings(settings)
    print("started", flush=True)
    options = DekRotationOptions(batch_size=3)
    dekrotation.rotate_data_keys(db, ring, None, options, on_progress=progress)
    print("finished without being killed")
    """
)


@pytest.fixture
def populated(vault: Vault, owner_engine: sa.Engine) -> dict[str, dict[tuple[str, str], str]]:
    add_tenants(owner_engine, TENANTS)
    return {tenant: populate(vault, tenant, configs=4) for tenant in TENANTS}


def _check_readable_then_rerun(
    vault: Vault,
    operator_db: Any,
    provider: Any,
    owner_engine: sa.Engine,
    expected: dict[str, dict[tuple[str, str], str]],
) -> None:
    vault.keyring.cache.clear()
    # Every value opens to its last written plaintext, whatever the crash left behind.
    assert {t: open_everything(vault, t) for t in TENANTS} == expected
    rerun = rotate_data_keys(
        operator_db, fresh_keyring(provider), None, DekRotationOptions(batch_size=3)
    )
    assert rerun.ok, rerun
    for tenant in TENANTS:
        states = key_states(owner_engine, tenant)
        active = [v for v, s in states.items() if s == "active"]
        assert len(active) == 1
        assert set(states.values()) <= {"active", "retired"}, states
        assert set(sealed_versions(owner_engine, tenant)) == set(active)
    vault.keyring.cache.clear()
    assert {t: open_everything(vault, t) for t in TENANTS} == expected


@pytest.mark.parametrize(
    "point",
    [
        "switch",
        "batches:0",
        "batches:1",
        "batches:4",
        "batches:9",
        "seals:1",
        "seals:2",
        "seals:11",
        "seals:25",
        "retire",
    ],
)
def test_sigkill_at_a_point_leaves_every_value_readable_and_a_rerun_completes(
    point: str,
    populated: dict[str, dict[tuple[str, str], str]],
    vault: Vault,
    operator_db: Any,
    provider: Any,
    owner_engine: sa.Engine,
    migrated: Settings,
    services: Services,
) -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, point],
        env=child_environment(migrated, services),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    _check_readable_then_rerun(vault, operator_db, provider, owner_engine, populated)


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.08, 0.15, 0.3])
def test_sigkill_after_a_delay_leaves_every_value_readable_and_a_rerun_completes(
    delay: float,
    populated: dict[str, dict[tuple[str, str], str]],
    vault: Vault,
    operator_db: Any,
    provider: Any,
    owner_engine: sa.Engine,
    migrated: Settings,
    services: Services,
) -> None:
    # Killed from outside, a chosen time after the child says it starts rotating.
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, "batches:1000000"],
        env=child_environment(migrated, services),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "started"
    time.sleep(delay)
    process.kill()
    process.wait(timeout=30)
    _check_readable_then_rerun(vault, operator_db, provider, owner_engine, populated)
