"""OpenBao stops answering in the middle of a DEK rotation: the run stops cleanly with a
clear message, nothing is half-written, and it resumes when OpenBao is back.

A private OpenBao is paused with SIGSTOP (it keeps its keys, as a real
Vault keeps its storage through an outage) and resumed with SIGCONT."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import hvac
import sqlalchemy as sa

from tenantvault import Vault
from tenantvault.dev import stack as devstack
from tenantvault.dev.stack import StackState
from tenantvault.kms.transit import TransitKeyProvider
from tenantvault.rotation.dek import Progress, rotate_data_keys
from tenantvault.settings import Settings
from tests.conftest import fresh_keyring
from tests.rotation_support import (
    add_tenants,
    key_states,
    open_everything,
    populate,
    sealed_versions,
)

TENANTS = ["t_o1", "t_o2", "t_o3", "t_o4"]
TIMEOUT = 1.0


def test_openbao_outage_mid_rotation_stops_cleanly_and_the_rerun_resumes(
    tmp_path: Path, app_settings: Settings, owner_engine: sa.Engine, operator_db: Any
) -> None:
    state = tmp_path / "own-openbao"
    environment = devstack.up(state, postgres=False).variables
    pid = StackState.load(state / "stack.json").openbao.pid  # type: ignore[union-attr]
    try:
        client = hvac.Client(
            url=environment["VAULT_ADDR"], token=environment["VAULT_TOKEN"], timeout=TIMEOUT
        )
        provider = TransitKeyProvider(client, key_name="outage", timeout_seconds=TIMEOUT)
        vault = Vault.from_settings(app_settings, key_provider=provider)
        add_tenants(owner_engine, TENANTS)
        expected = {t: populate(vault, t, configs=2) for t in TENANTS}
        before = {t: sealed_versions(owner_engine, t) for t in TENANTS}

        paused = []

        def pause_after_first_tenant(event: Progress) -> None:
            if event.finished is not None and not paused:
                os.kill(pid, signal.SIGSTOP)
                paused.append(event.tenant_id)

        try:
            report = rotate_data_keys(
                operator_db, fresh_keyring(provider), None, on_progress=pause_after_first_tenant
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        assert report.stopped is not None
        assert "key provider failed for tenant" in report.stopped
        assert f"transit at {environment['VAULT_ADDR']} did not answer within 1s" in report.stopped
        assert not report.ok
        done = {t.tenant_id: t.outcome for t in report.tenants}
        # The first tenant finished before the pause; the next one's keys may have been
        # asked for ahead, before the pause too (then it finishes without Vault).
        assert paused[0] in done
        assert set(done.values()) == {"rotated"}
        assert len(done) < len(TENANTS)
        # The tenants after the outage were not touched: no new key, no value moved.
        for tenant in TENANTS:
            if tenant not in done:
                assert key_states(owner_engine, tenant) == {1: "active"}
                assert sealed_versions(owner_engine, tenant) == before[tenant]

        resumed = rotate_data_keys(operator_db, fresh_keyring(provider), None)
        assert resumed.ok, resumed
        assert {t.tenant_id: t.to_version for t in resumed.tenants} == {
            t: 3 if t in done else 2 for t in TENANTS
        }
        vault.keyring.cache.clear()
        assert {t: open_everything(vault, t) for t in TENANTS} == expected
        vault.dispose()
    finally:
        devstack.down(state)
