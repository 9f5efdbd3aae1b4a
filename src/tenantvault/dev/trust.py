"""What the dev stack trusts on disk: directories and files only the running user controls.

The stack writes its root token and unseal key into its state dir, and reads back the
pids it stops and the addresses ``dev env`` prints. A state dir found by searching the
parents (``.tenantvault/dev``) may have been planted by another local user in a
directory everyone may write (``/tmp``): run by root below it, ``dev up`` would write
the root token into files that user owns. So every command first checks that the state
dir (and the ``.tenantvault`` above it) and every state file it finds there belong to
the running user and that no one else may write them; files holding secrets are made
new (``O_CREAT | O_EXCL``, mode 0600, never following a symlink) and renamed into place.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tenantvault.errors import DevStackError


def _refusal(info: os.stat_result, kind: str, owner: int) -> str | None:
    """Why a path (its ``lstat``) is not a ``kind`` that ``owner`` alone controls."""
    wanted = stat.S_ISDIR if kind == "directory" else stat.S_ISREG
    if not wanted(info.st_mode):
        found = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "something else"
        return f"it is {found}, not a {kind}"
    if info.st_uid != owner:
        whose = "this user" if owner == os.geteuid() else "the servers' system user"
        return f"it is owned by uid {info.st_uid}, not by {whose} (uid {owner})"
    if info.st_mode & 0o022:
        return f"group or others may write it (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def check_private(path: Path, kind: str = "file", *, owner: int | None = None) -> None:
    """Refuse ``path`` unless it is missing, or a ``kind`` ("file" or "directory"; not a
    symlink) that the running user (or ``owner``, a uid) owns and no one else may write.

    Raises:
        DevStackError: names the path and why; the message says what to do.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    reason = _refusal(info, kind, os.geteuid() if owner is None else owner)
    if reason is not None:
        raise DevStackError(
            f"refusing the dev stack's {kind} {path}: {reason}; another user could read or "
            "replace its secrets. Use a state dir of your own (--state-dir), or remove it"
        )


def make_private_dir(path: Path) -> None:
    """Make ``path`` (mode 0700, whatever the umask) and the missing directories above
    it; an existing one is only checked (:func:`check_private`)."""
    missing = [p for p in (path, *path.parents) if not os.path.lexists(p)]
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made meanwhile: checked below like any other
        else:
            directory.chmod(0o700)  # made here
    check_private(path, "directory")


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in a file that is 0600 from its creation on: a new
    file (O_EXCL, never one that was there, never through a symlink) in the same
    directory, renamed over the old one once written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def private_log(path: Path, *, owner: int | None = None) -> None:
    """An appendable log only its owner may read: made new (O_EXCL, 0600) when missing;
    an existing one must be a regular file of the running user (or of ``owner``, a uid:
    the servers' system user's, as root) that no one else may write, and is made 0600."""
    try:
        descriptor = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        check_private(path, owner=owner)
        path.chmod(0o600)
        return
    os.close(descriptor)
