"""The dev stack's PgBouncer (``pgbouncer_up``): started in front of a PostgreSQL in
transaction mode, stopped by ``down`` (the PgBouncer lane only)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tenantvault.dev import stack as devstack
from tenantvault.errors import DevStackError
from tenantvault.settings import parse_database_url
from tests.conftest import Services


def test_pgbouncer_up_pools_in_transaction_mode_and_down_stops_it(
    services: Services, tmp_path: Path
) -> None:
    server = parse_database_url(services.admin_url)
    assert server.username is not None
    assert server.port is not None
    record = devstack.pgbouncer_up(
        tmp_path, server_host="127.0.0.1", server_port=server.port, logins=[server.username]
    )
    try:
        url = f"postgresql://{server.username}@127.0.0.1:{record.port}/pgbouncer"
        with psycopg.connect(url, autocommit=True) as console:
            modes = {row[0]: row[1] for row in console.execute("SHOW CONFIG").fetchall()}
        assert modes["pool_mode"] == "transaction"
        assert devstack.StackState.load(tmp_path / "stack.json").pgbouncer == record
    finally:
        stopped = devstack.down(tmp_path)
    assert stopped == [f"pgbouncer (pid {record.pid})"]
    assert not devstack.process_alive(record.pid, "pgbouncer")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://x@127.0.0.1:{record.port}/x", connect_timeout=2)
    devstack.reset(tmp_path)


def test_a_login_that_is_not_a_plain_role_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DevStackError, match="plain role names"):
        devstack.start_pgbouncer(
            tmp_path, server_host="127.0.0.1", server_port=5432, logins=['x" "y']
        )
