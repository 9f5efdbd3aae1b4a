"""The dev stack trusts no directory or file it does not own: a ``.tenantvault/dev``
planted by another user in a directory everyone may write (``/tmp``) is refused, by
``dev up`` before it writes the root token there and by every other command before it
reads pids or addresses from it, with one FAILED: line naming the path and why."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from tenantvault import cli
from tenantvault.dev import stack as devstack


def child_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("TENANTVAULT_", "VAULT_"))}


def dev(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantvault.cli", "dev", *args],
        cwd=cwd,
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def refused(result: subprocess.CompletedProcess[str], path: Path, why: str) -> None:
    """One FAILED: line, exit 1, naming ``path`` and ``why``; nothing on stdout."""
    assert result.returncode == cli.EXIT_FAILED, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("FAILED: refusing the dev stack's "), lines[0]
    assert f" {path}: " in lines[0], lines[0]
    assert why in lines[0], lines[0]


def shared_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A directory everyone may write (as /tmp: sticky), and a checkout below it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    checkout = shared / "checkout"
    checkout.mkdir(mode=0o700)
    return shared, checkout


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="planting files as another user needs root")
@pytest.mark.parametrize("planted", ["dev", ".tenantvault"])
def test_up_refuses_a_state_dir_another_user_planted_and_writes_nothing_there(
    planted: str, tmp_path: Path
) -> None:
    """Another user (nobody) made ``.tenantvault/dev`` (or only ``.tenantvault``, so it
    could swap ``dev``) in a world-writable parent; root runs ``dev up`` below it."""
    uid = pwd.getpwuid(NOBODY).pw_uid
    shared, checkout = shared_checkout(tmp_path)
    state = shared / ".tenantvault" / "dev"
    state.mkdir(parents=True)
    for directory in (state.parent, state):
        directory.chmod(0o755)
    os.chown(state.parent if planted == ".tenantvault" else state, uid, uid)
    refused(
        dev("up", cwd=checkout),
        state.parent if planted == ".tenantvault" else state,
        f"owned by uid {uid}",
    )
    assert list(state.iterdir()) == []  # no key file, no record, no env
    # Nor does any other command read what it holds.
    (state / "stack.json").write_text(json.dumps({"openbao": {"pid": 1, "port": 1}}))
    for action in ("env", "down", "reset"):
        refused(
            dev(action, cwd=checkout),
            state.parent if planted == ".tenantvault" else state,
            f"owned by uid {uid}",
        )
    assert (state / "stack.json").exists()


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777])
def test_up_refuses_a_state_dir_that_group_or_others_may_write(mode: int, tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    state = checkout / ".tenantvault" / "dev"
    state.mkdir(parents=True, mode=0o700)
    state.chmod(mode)
    refused(dev("up", cwd=checkout), state, f"group or others may write it (mode {mode:04o})")
    assert list(state.iterdir()) == []


def test_a_state_file_someone_else_could_have_written_is_refused(tmp_path: Path) -> None:
    """Inside a state dir of the user's own: a record others may write, and a key file
    that is a symlink (up would write the root token wherever it points)."""
    state = tmp_path / "stack"
    state.mkdir(mode=0o700)
    record = state / "stack.json"
    record.write_text(json.dumps({"openbao": {"pid": 1, "port": 1}}))
    record.chmod(0o666)
    refused(dev("env", "--state-dir", str(state), cwd=tmp_path), record, "(mode 0666)")
    record.unlink()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    (state / "openbao-keys.json").symlink_to(elsewhere)
    refused(
        dev("up", "--state-dir", str(state), cwd=tmp_path),
        state / "openbao-keys.json",
        "it is a symbolic link, not a file",
    )
    assert elsewhere.read_text() == "{}"
    assert sorted(p.name for p in state.iterdir()) == ["openbao-keys.json"]


def test_up_makes_the_state_dir_and_the_dir_above_it_private_under_any_umask(
    tmp_path: Path,
) -> None:
    """What ``up`` creates it can trust next time: ``.tenantvault`` too is 0700."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    previous = os.umask(0o002)
    try:
        state, _ = devstack.locate_state_dir(start=checkout)
        devstack.trust.make_private_dir(state)
    finally:
        os.umask(previous)
    for directory in (state, state.parent):
        assert oct(directory.stat().st_mode & 0o777) == "0o700", directory
    assert oct(checkout.stat().st_mode & 0o777) != "0o700"  # not made here: left alone


def test_a_record_is_written_into_a_new_file_never_through_what_was_there(
    tmp_path: Path,
) -> None:
    """A symlink (or a file opened by someone else) where the record goes: the record
    is a new 0600 file renamed into place, and the symlink's target is untouched."""
    target = tmp_path / "target"
    target.write_text("someone else's")
    record = tmp_path / "stack.json"
    record.symlink_to(target)
    previous = os.umask(0)
    try:
        devstack.StackState(vault_token="root-token-not-for-others").save(record)
    finally:
        os.umask(previous)
    assert target.read_text() == "someone else's"
    assert not record.is_symlink()
    assert oct(record.stat().st_mode & 0o777) == "0o600"
    assert json.loads(record.read_text())["vault_token"] == "root-token-not-for-others"
