"""A real three-node OpenBao cluster (tenantvault.dev.cluster), started once for the
session by the first test here that asks for it, stopped afterwards; before each test
every node runs again, unsealed, with one active (a test may have killed one).

They run in the normal suite (scripts/test, and so .ci/run): the cluster starts in
about 7 s and the tests take about 35 s on a 2-core machine."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tenantvault.dev.cluster import OpenBaoCluster, start_cluster
from tenantvault.settings import Settings, load_settings
from tests.rotation_support import add_tenants

# Printed in the test report: how long the cluster took to start.
STARTED: dict[str, float] = {}


@pytest.fixture(scope="session")
def openbao_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoCluster]:
    started = time.monotonic()
    cluster = start_cluster(Path(tmp_path_factory.mktemp("openbao-cluster")))
    STARTED["seconds"] = time.monotonic() - started
    print(f"\nthree-node OpenBao cluster started in {STARTED['seconds']:.1f}s")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(openbao_cluster: OpenBaoCluster) -> OpenBaoCluster:
    openbao_cluster.heal()
    return openbao_cluster


def cluster_settings(database_url: str, cluster: OpenBaoCluster, **overrides: object) -> Settings:
    """Settings over ``database_url`` whose transit is the cluster (every node listed),
    with a transit key of the test's own."""
    overrides.setdefault("transit_key", f"ha-{uuid.uuid4().hex[:8]}")
    return load_settings(
        database_url=database_url,
        vault_addrs=",".join(cluster.addresses),
        VAULT_TOKEN=cluster.root_token,
        **overrides,
    )


@pytest.fixture
def ha_settings(app_url: str, owner_engine: sa.Engine, cluster: OpenBaoCluster) -> Settings:
    """The application's settings with the cluster as transit."""
    return cluster_settings(app_url, cluster)


def tenants(owner_engine: sa.Engine, count: int) -> list[str]:
    names = [f"t_ha{n:03d}" for n in range(count)]
    add_tenants(owner_engine, names)
    return names
