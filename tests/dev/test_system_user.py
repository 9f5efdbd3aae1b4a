"""As root, PostgreSQL runs as a system user the stack creates on first use. Two
``dev up`` runs at once must not race on creating it: every one succeeds."""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

CREATE_WHEN_TOLD = """
import sys
from tenantvault.dev.stack import ensure_system_user
print("ready", flush=True)
sys.stdin.readline()
ensure_system_user(sys.argv[1])
"""


def passwd_lines(name: str) -> int:
    return sum(line.startswith(f"{name}:") for line in Path("/etc/passwd").read_text().splitlines())


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a system user needs root")
def test_six_processes_creating_the_same_user_at_once_all_succeed() -> None:
    name = f"tv_race_{secrets.token_hex(4)}"
    assert passwd_lines(name) == 0
    children: list[subprocess.Popen[str]] = []
    try:
        for _ in range(6):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-c", CREATE_WHEN_TOLD, name],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for child in children:  # all imported and waiting...
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
        for child in children:  # ...then all go at once
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        errors = [child.communicate(timeout=120)[1] for child in children]
        assert [child.returncode for child in children] == [0] * 6, errors
        assert pwd.getpwnam(name).pw_shell == "/usr/sbin/nologin"
        assert passwd_lines(name) == 1
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        subprocess.run(["userdel", name], capture_output=True, check=False)
        subprocess.run(["groupdel", name], capture_output=True, check=False)
    assert passwd_lines(name) == 0
