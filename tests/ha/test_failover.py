"""Transit HA against a real three-node OpenBao cluster: a node is SIGKILLed during a
run of loads, and during a KEK rotation. Cached loads never fail; uncached ones fail
only inside the election window (a failure after the cluster has an active node again
is a failure of the failover); afterwards everything opens, nothing lost. The window,
the failed calls and the slowest uncached load are printed (pytest -s shows them)."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import Vault
from tenantvault.db.operator import OperatorDatabase
from tenantvault.dev.cluster import OpenBaoCluster
from tenantvault.errors import KeyProviderUnavailable
from tenantvault.kms.factory import key_provider_from_settings, transit_client
from tenantvault.kms.health import transit_status
from tenantvault.rotation.kek import rotate_kek
from tenantvault.rotation.options import KekRotationOptions
from tenantvault.settings import Settings
from tests.ha.conftest import cluster_settings, tenants
from tests.rotation_support import SMTP, open_everything, populate

RUN_SECONDS = 8.0
KILL_AFTER_SECONDS = 1.0
# Loads that fail later than this after the kill fail outside any election.
WINDOW_LIMIT_SECONDS = 10.0


@dataclass(frozen=True)
class Load:
    at: float  # seconds since the run started
    cached: bool
    seconds: float
    error: str | None


class Election:
    """Kills ``victim`` after KILL_AFTER_SECONDS and times until a node is active again."""

    def __init__(self, cluster: OpenBaoCluster, victim: Any, started: float) -> None:
        self.killed_at: float | None = None
        self.active_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(cluster, victim, started))
        self._thread.start()

    def _run(self, cluster: OpenBaoCluster, victim: Any, started: float) -> None:
        time.sleep(KILL_AFTER_SECONDS)
        cluster.kill(victim)
        self.killed_at = time.monotonic() - started
        while cluster.active() is None:
            time.sleep(0.02)
        self.active_at = time.monotonic() - started

    def join(self) -> None:
        self._thread.join()


def _load(vault: Vault, tenant: str, config_id: str, expected: str) -> tuple[float, str | None]:
    began = time.monotonic()
    try:
        credentials: Any = vault.load_credentials(tenant, config_id)
    except KeyProviderUnavailable as exc:
        return time.monotonic() - began, type(exc).__name__
    assert credentials.password.get_secret_value() == expected
    return time.monotonic() - began, None


def _places(vault: Vault, names: list[str]) -> list[tuple[str, str, str]]:
    places = []
    for tenant in names:
        config = vault.create_config(
            tenant, type="smtp", name="smtp", config=SMTP, credentials={"password": tenant}
        )
        places.append((tenant, config.id, tenant))
    return places


@pytest.mark.parametrize("victim", ["the node it talks to (active)", "a standby"])
def test_loads_fail_only_inside_the_election_window_when_a_node_is_killed(
    victim: str, cluster: OpenBaoCluster, ha_settings: Settings, owner_engine: sa.Engine
) -> None:
    writer = Vault.from_settings(ha_settings)
    places = _places(writer, tenants(owner_engine, 40))
    writer.dispose()
    # One vault with every key cached, one whose cache holds one key: each of its
    # loads (cycling over the tenants) unwraps at transit.
    warm = Vault.from_settings(ha_settings)
    cold = Vault.from_settings(
        cluster_settings(
            ha_settings.database_url.get_secret_value(),
            cluster,
            transit_key=ha_settings.transit_key,
            dek_cache_max_entries=1,
        )
    )
    for place in places:
        assert _load(warm, *place)[1] is None
        assert _load(cold, *place)[1] is None
    # The node a client of these settings talks to once it answered: the active one.
    client = transit_client(ha_settings)
    client.sys.list_mounted_secrets_engines()
    active = cluster.active()
    assert active is not None
    assert client.adapter.base_uri == active.address
    target = (
        active
        if victim.endswith("(active)")
        else next(node for node in cluster.nodes if node is not active)
    )
    loads: list[Load] = []
    started = time.monotonic()
    election = Election(cluster, target, started)
    for place in itertools.cycle(places):
        now = time.monotonic() - started
        if now > RUN_SECONDS:
            break
        for vault, cached in ((warm, True), (cold, False)):
            seconds, error = _load(vault, *place)
            loads.append(Load(now, cached, seconds, error))
    election.join()
    warm.dispose()
    cold.dispose()

    assert election.killed_at is not None
    assert election.active_at is not None
    failed = [load for load in loads if load.error is not None]
    uncached = [load for load in loads if not load.cached]
    print(
        f"\n{victim}: killed at {election.killed_at:.2f}s, a node active again after "
        f"{election.active_at - election.killed_at:.2f}s; {len(uncached)} uncached loads, "
        f"{len(failed)} failed"
        + (f" (from {failed[0].at:.2f}s to {failed[-1].at:.2f}s)" if failed else "")
        + f", slowest {max(load.seconds for load in uncached):.2f}s"
    )
    assert not [load for load in failed if load.cached]
    assert all(
        election.killed_at <= load.at <= election.killed_at + WINDOW_LIMIT_SECONDS
        for load in failed
    )
    assert len(uncached) > 100  # the run kept loading through the kill
    after = Vault.from_settings(ha_settings)
    try:
        for place in places:
            assert _load(after, *place)[1] is None
    finally:
        after.dispose()


def test_kek_rotation_killed_with_the_active_node_completes_when_rerun(
    cluster: OpenBaoCluster, ha_settings: Settings, migrated: Settings, owner_engine: sa.Engine
) -> None:
    writer = Vault.from_settings(ha_settings)
    names = tenants(owner_engine, 30)
    expected = {tenant: populate(writer, tenant, configs=1) for tenant in names}
    writer.dispose()
    operator = cluster_settings(
        migrated.database_url.get_secret_value(), cluster, transit_key=ha_settings.transit_key
    )
    db = OperatorDatabase.from_settings(operator)
    provider = key_provider_from_settings(operator)
    killed: list[float] = []

    def kill_active(progress: Any) -> None:
        if not killed:
            active = cluster.active()
            assert active is not None
            cluster.kill(active)
            killed.append(time.monotonic())

    runs = []
    try:
        for _ in range(3):
            try:
                report = rotate_kek(
                    db, provider, KekRotationOptions(batch_size=5), on_progress=kill_active
                )
            except KeyProviderUnavailable as exc:
                runs.append(f"failed: {exc}")
                continue
            runs.append(
                f"v{report.kek_before}->v{report.kek_after}, rewrapped {report.rewrapped}, "
                f"behind {report.behind}, failures {report.failures[:2]}"
            )
            if report.ok:
                break
        print(f"\nKEK rotation with the active node killed after its first batch: {runs}")
        assert killed
        assert report.ok
        assert (report.kek_after, report.behind) == (2, 0)
        with owner_engine.connect() as connection:
            versions = connection.execute(
                sa.text("SELECT DISTINCT kek_version FROM dripiq_app.tenant_data_keys")
            ).scalars()
            assert set(versions) == {2}
    finally:
        db.dispose()
    reader = Vault.from_settings(ha_settings)
    try:
        for tenant in names:
            assert open_everything(reader, tenant) == expected[tenant]
    finally:
        reader.dispose()


def test_status_shows_each_nodes_state(cluster: OpenBaoCluster, ha_settings: Settings) -> None:
    active = cluster.active()
    assert active is not None
    standby = next(node for node in cluster.nodes if node is not active)
    cluster.kill(standby)
    status = transit_status(ha_settings)
    assert status.reachable
    assert f"{active.address} active" in status.summary
    assert f"{standby.address} unreachable" in status.summary
    others = [node for node in cluster.nodes if node not in (active, standby)]
    assert f"{others[0].address} standby" in status.summary
