"""The dev stack from wheels: up starts PostgreSQL and OpenBao with transit, a second up
reuses them, down stops exactly what up started. OpenBao keeps its storage under the
state dir, so what transit sealed opens again after down and up; reset deletes it."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import hvac
import psycopg
import pytest

from tenantvault.dev import stack as devstack
from tenantvault.errors import DevStackError


def child_environment() -> dict[str, str]:
    """This environment without the variables ``dev env`` sets."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TENANTVAULT_", "VAULT_"))}


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


# A fresh process takes the stack's variables from `dev env`, reads the row and has
# transit open its ciphertext.
DECRYPT_IN_A_FRESH_PROCESS = """
import base64, os, hvac, psycopg
with psycopg.connect(os.environ["TENANTVAULT_DATABASE_URL"]) as connection:
    [ciphertext] = connection.execute("SELECT ciphertext FROM sealed WHERE id = 1").fetchone()
client = hvac.Client(url=os.environ["VAULT_ADDR"], token=os.environ["VAULT_TOKEN"])
opened = client.secrets.transit.decrypt_data(name="persist", ciphertext=ciphertext)
print(base64.b64decode(opened["data"]["plaintext"]).decode())
"""


def test_a_transit_ciphertext_stored_in_postgres_opens_after_down_and_up(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    plaintext = "smtp password, sealed by transit"
    try:
        first = devstack.up(state)
        client = hvac.Client(
            url=first.variables["VAULT_ADDR"], token=first.variables["VAULT_TOKEN"]
        )
        client.secrets.transit.create_key(name="persist")
        sealed = client.secrets.transit.encrypt_data(
            name="persist", plaintext=base64.b64encode(plaintext.encode()).decode()
        )["data"]["ciphertext"]
        with psycopg.connect(first.variables["TENANTVAULT_DATABASE_URL"]) as connection:
            connection.execute("CREATE TABLE sealed (id int PRIMARY KEY, ciphertext text)")
            connection.execute("INSERT INTO sealed VALUES (1, %s)", (sealed,))
        before = devstack.StackState.load(state / "stack.json")
        assert before.openbao is not None
        assert before.postgres is not None

        assert len(devstack.down(state)) == 2
        second = devstack.up(state)
        after = devstack.StackState.load(state / "stack.json")
        assert after.openbao is not None
        assert after.postgres is not None
        # New processes on the same storage, reached with the same root token.
        assert (after.openbao.pid, after.postgres.pid) != (before.openbao.pid, before.postgres.pid)
        assert second.variables["VAULT_TOKEN"] == first.variables["VAULT_TOKEN"]
        # The root token is on no process's command line.
        token = second.variables["VAULT_TOKEN"].encode()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                assert token not in cmdline.read_bytes(), cmdline
            except OSError:
                continue  # the process ended

        result = subprocess.run(
            [
                "bash",
                "-c",
                'eval "$("$0" -m tenantvault.cli dev env --state-dir "$1")" && exec "$0" -c "$2"',
                sys.executable,
                str(state),
                DECRYPT_IN_A_FRESH_PROCESS,
            ],
            env=child_environment(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == plaintext + "\n"
    finally:
        devstack.reset(state)


def test_the_key_file_is_the_owners_only_under_any_umask(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    previous = os.umask(0)  # what up makes is private by its own modes, not the umask's
    try:
        environment = devstack.up(state, postgres=False)
    finally:
        os.umask(previous)
    try:
        key_file = state / "openbao-keys.json"
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        keys = json.loads(key_file.read_text())
        assert set(keys) == {"unseal_key", "root_token"}
        assert keys["root_token"] == environment.variables["VAULT_TOKEN"]
        for private in (state, state / "openbao", state / "openbao" / "data"):
            assert oct(private.stat().st_mode & 0o777) == "0o700", private
        for private in ("stack.json", "env", "openbao.log", "openbao/config.json"):
            assert oct((state / private).stat().st_mode & 0o777) == "0o600", private
        # No temporary copy of the keys is left beside it.
        assert [p.name for p in state.iterdir() if "openbao-keys" in p.name] == [key_file.name]
    finally:
        devstack.reset(state)


def test_reset_deletes_openbao_storage_and_key_file_and_nothing_else(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    state.mkdir(mode=0o700)
    (state / "notes.txt").write_text("not the stack's")
    try:
        first = devstack.up(state, postgres=False)
        client = hvac.Client(
            url=first.variables["VAULT_ADDR"], token=first.variables["VAULT_TOKEN"]
        )
        client.secrets.transit.create_key(name="forgotten")
        assert (state / "openbao" / "data").is_dir()
        assert (state / "openbao-keys.json").is_file()

        assert len(devstack.reset(state).stopped) == 1
        assert sorted(p.name for p in state.iterdir()) == ["notes.txt"]

        # The next up starts on empty storage: a new root token, no old transit key.
        second = devstack.up(state, postgres=False)
        assert second.variables["VAULT_TOKEN"] != first.variables["VAULT_TOKEN"]
        fresh = hvac.Client(
            url=second.variables["VAULT_ADDR"], token=second.variables["VAULT_TOKEN"]
        )
        assert "transit/" in fresh.sys.list_mounted_secrets_engines()["data"]
        with pytest.raises(hvac.exceptions.InvalidPath):
            fresh.secrets.transit.read_key(name="forgotten")
    finally:
        devstack.reset(state)


IGNORES_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(600)
"""


def _openbao_lookalike(state: Path) -> subprocess.Popen[str]:
    """A process whose command line is the stack's OpenBao's (its config path), that
    ignores SIGTERM: what down meets when a server is slow to stop."""
    (state / "openbao").mkdir(mode=0o700, parents=True)
    marker = f"-config={(state / 'openbao').resolve() / 'config.json'}"
    child = subprocess.Popen(
        [sys.executable, "-c", IGNORES_SIGTERM, marker], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "ready\n"
    return child


def test_env_refuses_a_stack_whose_openbao_has_stopped(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    state.mkdir(mode=0o700)
    child = _openbao_lookalike(state)
    devstack.StackState(
        openbao=devstack.ServiceRecord(pid=child.pid, port=8200), vault_token="t"
    ).save(state / "stack.json")
    try:
        assert devstack.stack_env(state).variables["VAULT_ADDR"] == "http://127.0.0.1:8200"
    finally:
        child.kill()
        child.wait()
    with pytest.raises(DevStackError, match=rf"OpenBao \(pid {child.pid}, port 8200\) stopped"):
        devstack.stack_env(state)


def test_down_kills_a_server_that_ignores_sigterm_and_returns_once_it_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "stack"
    state.mkdir(mode=0o700)
    child = _openbao_lookalike(state)
    try:
        devstack.StackState(openbao=devstack.ServiceRecord(pid=child.pid, port=1)).save(
            state / "stack.json"
        )
        monkeypatch.setattr(devstack, "STOP_GRACE_SECONDS", 0.5)
        assert devstack.down(state) == [f"openbao (pid {child.pid})"]
        # Exited (a zombie until this test, its parent, reaps it), by SIGKILL.
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        assert stat.rsplit(")", 1)[1].split()[0] == "Z"
        assert child.wait(timeout=5) == -signal.SIGKILL
        # The port stays recorded for the next up.
        assert devstack.StackState.load(state / "stack.json").ports == {"openbao": 1}
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
