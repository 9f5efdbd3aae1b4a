"""A three-node OpenBao cluster on loopback: Raft storage, one ``bao server`` per node.

For the HA tests (tests/ha) and, later, ``dev up --ha``. The first node is initialised
(one key share) and unsealed; each other node joins it (``sys/storage/raft/join``) and
is unsealed with the same key, so Raft replicates to it and it stands by. Any node
answers: a standby forwards requests to the active node (OpenBao's request
forwarding over the cluster port). A node killed (``kill``) keeps its storage;
``start`` brings it back, unsealed, as a member again.

Plain HTTP on 127.0.0.1 and the unseal key held in memory beside the data it opens:
for development and tests only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hvac

from tenantvault.dev import trust
from tenantvault.dev.stack import (
    STARTUP_TIMEOUT_SECONDS,
    bao_binary,
    free_port,
    openbao_client,
)
from tenantvault.errors import DevStackError

# Raft's timing scaled down (performance_multiplier 1, the fastest): a lost active node
# is noticed and replaced within seconds rather than OpenBao's production default.
PERFORMANCE_MULTIPLIER = 1
# A node's role in the cluster (``OpenBaoCluster.role``); "sealed" and "down" besides.
ACTIVE, STANDBY = "active", "standby"


@dataclass
class ClusterNode:
    """One ``bao server`` of the cluster: its name, API port (Raft's is the next) and
    process (None while it is down)."""

    name: str
    port: int
    home: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.home / "config.json"

    @property
    def log(self) -> Path:
        return self.home / "openbao.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class OpenBaoCluster:
    """The nodes, the unseal key and the root token of a cluster ``start_cluster`` made."""

    nodes: list[ClusterNode]
    unseal_key: str = field(repr=False)
    root_token: str = field(repr=False)

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    def role(self, node: ClusterNode) -> str:
        """ "active", "standby", "sealed" or "down" (``sys/health``, unauthenticated)."""
        if not node.running:
            return "down"
        try:
            health = openbao_client(node.port, timeout=2).sys.read_health_status(method="HEAD")
        except Exception:
            return "down"
        code = getattr(health, "status_code", None)
        return {200: ACTIVE, 429: STANDBY, 473: STANDBY}.get(code or 0, "sealed")

    def active(self) -> ClusterNode | None:
        for node in self.nodes:
            if self.role(node) == ACTIVE:
                return node
        return None

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL the node (no shutdown: as a crashed machine) and reap it."""
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
        node.process = None

    def start(self, node: ClusterNode, *, join: str | None = None) -> None:
        """Start the node's server (again) and unseal it; ``join``: a member's address
        to join first (a new node)."""
        node.process = _spawn(node)
        client = openbao_client(node.port, timeout=STARTUP_TIMEOUT_SECONDS)
        _wait(lambda: _answers(client), f"OpenBao node {node.name}", node)
        if join is not None:
            client.sys.join_raft_cluster(leader_api_addr=join)
        client.sys.submit_unseal_key(self.unseal_key)

    def heal(self) -> None:
        """Every node running and unsealed, and one of them active."""
        for node in self.nodes:
            if not node.running:
                self.start(node)
        _wait(
            lambda: (
                self.active() is not None
                and all(self.role(node) in (ACTIVE, STANDBY) for node in self.nodes)
            ),
            "the OpenBao cluster (every node unsealed, one active)",
            self.nodes[0],
        )

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                node.process.terminate()
                try:
                    node.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()
                node.process = None


def _answers(client: hvac.Client) -> bool:
    try:
        client.sys.read_seal_status()
    except Exception:
        return False
    return True


def _voters(client: hvac.Client) -> int:
    servers = client.read("sys/storage/raft/configuration")["data"]["config"]["servers"]
    return sum(1 for server in servers if server["voter"])


def _wait(check: Callable[[], bool], what: str, node: ClusterNode) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if node.process is not None and node.process.poll() is not None:
            raise DevStackError(f"OpenBao node {node.name} exited; see {node.log}")
        if check():
            return
        time.sleep(0.05)
    tail = node.log.read_text(errors="replace")[-2000:] if node.log.exists() else ""
    raise DevStackError(
        f"{what} not ready within {STARTUP_TIMEOUT_SECONDS:.0f}s; {node.name}'s log tail:\n{tail}"
    )


def _write_config(node: ClusterNode) -> None:
    node.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    (node.home / "data").mkdir(mode=0o700, exist_ok=True)
    config = {
        "storage": {
            "raft": {
                "path": str(node.home / "data"),
                "node_id": node.name,
                "performance_multiplier": PERFORMANCE_MULTIPLIER,
                # Autopilot promotes a joined node to a voter on its next pass (every
                # 10s by default): until then, losing the first node would lose quorum.
                "autopilot_reconcile_interval": "1s",
                "autopilot_update_interval": "500ms",
            }
        },
        "listener": [
            {
                "tcp": {
                    "address": f"127.0.0.1:{node.port}",
                    "cluster_address": f"127.0.0.1:{node.port + 1}",
                    "tls_disable": True,
                }
            }
        ],
        "api_addr": node.address,
        "cluster_addr": f"https://127.0.0.1:{node.port + 1}",
        "ui": False,
    }
    trust.write_private(node.config, json.dumps(config, indent=2))


def _spawn(node: ClusterNode) -> subprocess.Popen[bytes]:
    # As stack.start_openbao: no token on the command line or in the environment.
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    trust.private_log(node.log)
    with node.log.open("ab") as log_file:
        return subprocess.Popen(  # noqa: S603
            [str(bao_binary()), "server", f"-config={node.config}"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=environment,
        )


def start_cluster(state_dir: Path, *, size: int = 3) -> OpenBaoCluster:
    """A new cluster of ``size`` nodes under ``state_dir`` (which must not hold one):
    initialised, unsealed, joined, with the transit engine mounted.

    Raises:
        DevStackError: a node did not start or the cluster did not elect an active node
            within STARTUP_TIMEOUT_SECONDS; every node started is stopped again.
    """
    nodes: list[ClusterNode] = []
    for index in range(size):
        port = free_port(also_next=True)
        while any(port in (n.port, n.port + 1, n.port - 1) for n in nodes):
            port = free_port(also_next=True)
        nodes.append(ClusterNode(f"node{index + 1}", port, state_dir / f"openbao-node{index + 1}"))
    cluster = OpenBaoCluster(nodes, unseal_key="", root_token="")
    try:
        first = nodes[0]
        _write_config(first)
        first.process = _spawn(first)
        client = openbao_client(first.port, timeout=STARTUP_TIMEOUT_SECONDS)
        _wait(lambda: _answers(client), f"OpenBao node {first.name}", first)
        result = client.sys.initialize(secret_shares=1, secret_threshold=1)
        cluster.unseal_key, cluster.root_token = result["keys_base64"][0], result["root_token"]
        client.sys.submit_unseal_key(cluster.unseal_key)
        _wait(lambda: cluster.role(first) == ACTIVE, "the first OpenBao node", first)
        client.token = cluster.root_token
        client.sys.enable_secrets_engine("transit", path="transit")
        # ... and once it has been healthy this long (10s by default).
        client.write_data(
            "sys/storage/raft/autopilot/configuration",
            data={"server_stabilization_time": "1s", "cleanup_dead_servers": False},
        )
        for node in nodes[1:]:
            _write_config(node)
            cluster.start(node, join=first.address)
        cluster.heal()
        _wait(lambda: _voters(client) == size, "every OpenBao node a Raft voter", first)
    except BaseException:
        cluster.stop()
        raise
    return cluster
