"""A hot standby of the dev stack's PostgreSQL: PostgreSQL's own streaming
replication, from the embedded server's ``pg_basebackup -R`` into a second data
directory, started on its own loopback port (the tests' replica fixtures use it).

The primary needs nothing the dev stack does not already have: ``wal_level`` is
``replica`` by default, ``initdb --auth=trust`` lets ``postgres`` (a superuser, so
a replication role) connect for replication from 127.0.0.1, and the standby reads
with the same roles, rows and row-level security as the primary.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tenantvault.dev import stack


@dataclass(frozen=True)
class Standby:
    """A standby's data directory and port (it may be stopped and started again)."""

    data_dir: Path
    port: int

    @property
    def url(self) -> str:
        """The superuser's URL on it (read-only: it is in recovery)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        log = self.data_dir.parent / f"{self.data_dir.name}.log"
        user = stack._pg_run_as()
        log.touch(mode=0o600)
        stack._give_to(user, log)
        stack._pg(
            ["pg_ctl", "-D", str(self.data_dir), "-l", str(log), "-w", "-t", "60", "start"],
            user,
            log,
        )

    def stop(self) -> None:
        stack._pg(
            ["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
            stack._pg_run_as(),
        )


def make_standby(state_dir: Path, primary_port: int, *, name: str = "standby") -> Standby:
    """A standby of the PostgreSQL listening on ``primary_port`` (loopback), copied by
    ``pg_basebackup -R`` under ``state_dir``'s PostgreSQL home and started; a copy made
    before is replaced."""
    user = stack._pg_run_as()
    home = stack._make_postgres_home(state_dir)
    data_dir = home / name
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(mode=0o700)
    stack._give_to(user, data_dir)
    stack._pg(
        [
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary_port),
            "-U",
            "postgres",
            "-D",
            str(data_dir),
            "-R",  # standby.signal and primary_conninfo: a streaming replica
            "-X",
            "stream",
            "-c",
            "fast",
        ],
        user,
    )
    port = stack.free_port()
    # The primary's tenantvault.conf came with the copy: the standby's own port, and its
    # function calls counted (what tests count loads by: nothing is written on a standby).
    (data_dir / "tenantvault.conf").write_text(
        f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
        "fsync = off\nmax_connections = 200\nhot_standby = on\ntrack_functions = 'all'\n"
    )
    standby = Standby(data_dir, port)
    standby.start()
    return standby


def remove_standby(standby: Standby) -> None:
    """Stop ``standby`` (if it runs) and delete its data directory and log."""
    if (standby.data_dir / "postmaster.pid").exists():
        standby.stop()
    shutil.rmtree(standby.data_dir, ignore_errors=True)
    (standby.data_dir.parent / f"{standby.data_dir.name}.log").unlink(missing_ok=True)
