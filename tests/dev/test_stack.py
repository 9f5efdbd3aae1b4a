"""The dev stack from wheels: up starts PostgreSQL and OpenBao with transit, a second up
reuses them, down stops exactly what up started."""

from __future__ import annotations

from pathlib import Path

import hvac
import psycopg
import pytest

from tenantvault.dev import stack as devstack
from tenantvault.errors import DevStackError


def test_up_is_idempotent_and_down_stops_exactly_what_up_started(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    # Directories the stack did not create keep their modes (as root too).
    parents = {p: p.stat().st_mode for p in tmp_path.resolve().parents} | {
        tmp_path: tmp_path.stat().st_mode
    }
    try:
        first = devstack.up(state)
        assert {p: p.stat().st_mode for p in parents} == parents
        recorded = devstack.StackState.load(state / "stack.json")
        assert recorded.postgres is not None
        assert recorded.openbao is not None
        with psycopg.connect(first.variables["TENANTVAULT_DATABASE_URL"]) as connection:
            assert connection.execute("SELECT current_database()").fetchone() == ("tenantvault",)
        client = hvac.Client(
            url=first.variables["VAULT_ADDR"], token=first.variables["VAULT_TOKEN"]
        )
        assert "transit/" in client.sys.list_mounted_secrets_engines()["data"]
        assert (state / "env").read_text() == first.as_shell()
        assert oct((state / "env").stat().st_mode & 0o777) == "0o600"
        # The root token is in no process's arguments, and the logs are the owner's only.
        cmdline = Path(f"/proc/{recorded.openbao.pid}/cmdline").read_bytes()
        assert first.variables["VAULT_TOKEN"].encode() not in cmdline
        for log in (state / "openbao.log", devstack.postgres_home(state) / "postgres.log"):
            assert oct(log.stat().st_mode & 0o777) == "0o600", log

        second = devstack.up(state)
        again = devstack.StackState.load(state / "stack.json")
        assert second == first
        assert (again.postgres, again.openbao) == (recorded.postgres, recorded.openbao)

        stopped = devstack.down(state)
        assert stopped == [
            f"openbao (pid {recorded.openbao.pid})",
            f"postgres (pid {recorded.postgres.pid})",
        ]
        assert not devstack.process_alive(recorded.openbao.pid, str(devstack.bao_binary()))
        assert not devstack.process_alive(recorded.postgres.pid, "postgres")
        assert devstack.down(state) == []
        with pytest.raises(DevStackError, match="dev up"):
            devstack.stack_env(state)
    finally:
        devstack.reset(state)


def test_down_leaves_a_process_that_reused_a_recorded_pid_alone(tmp_path: Path) -> None:
    import os

    state = tmp_path / "stack"
    state.mkdir()
    # A record pointing at this very test process, which is not OpenBao or PostgreSQL.
    devstack.StackState(
        postgres=devstack.ServiceRecord(pid=os.getpid(), port=1),
        openbao=devstack.ServiceRecord(pid=os.getpid(), port=2),
    ).save(state / "stack.json")
    assert devstack.down(state) == []
