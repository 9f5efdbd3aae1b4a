"""Real services for the tests: a throwaway PostgreSQL (or TENANTVAULT_TEST_DATABASE_URL)
and an OpenBao dev server, started once per session and stopped afterwards, even
when tests fail or the run is interrupted. A service that cannot start fails the
run; nothing is skipped.

The PgBouncer lane (TENANTVAULT_TEST_PGBOUNCER=1; scripts/test runs it when the
machine has a ``pgbouncer`` binary) also starts a PgBouncer in transaction pooling
mode in front of that PostgreSQL: the application's connections (``app_url``,
``app_settings``) and the operator jobs' (``migrated``, ``operator_db``) go through
it, with the settings docs/pgbouncer.md gives for it; migrations and the tests' own
owner connections (``settings``, ``owner_engine``) go straight to PostgreSQL, as an
operator's migration does. tests/pgbouncer/ is collected in that lane only."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic.config import Config

from tenantvault.db.migration_support import MigrationOptions
from tenantvault.dev import stack as devstack
from tenantvault.ops import migrate
from tenantvault.ops.migrate import alembic_config as make_alembic_config
from tenantvault.ops.migrate import migration_engine
from tenantvault.settings import Settings, load_settings, parse_database_url

APP_LOGIN_ROLE = "tenantvault_test_app_login"

PGBOUNCER_LANE = os.environ.get("TENANTVAULT_TEST_PGBOUNCER") == "1"
# What a deployment behind PgBouncer 1.18 in transaction mode sets (docs/pgbouncer.md):
# in the environment, so that every Settings of the lane (child processes' too) has it.
PGBOUNCER_SETTINGS = {
    "TENANTVAULT_SERVER_PREPARED_STATEMENTS": "false",
    "TENANTVAULT_SEND_STATEMENT_TIMEOUT": "false",
}
# The statement timeout a database gets in that lane, where it is not sent: the default
# of TENANTVAULT_STATEMENT_TIMEOUT_MS, which each new connection checks it against.
LANE_STATEMENT_TIMEOUT_MS = 30_000
collect_ignore = [] if PGBOUNCER_LANE else ["pgbouncer"]


def pytest_configure(config: pytest.Config) -> None:
    if PGBOUNCER_LANE:
        os.environ.update(PGBOUNCER_SETTINGS)


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No TENANTVAULT_* / VAULT_* variables and no stray .env for settings tests."""
    for name in list(os.environ):
        if name.startswith(("TENANTVAULT_", "VAULT_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@dataclass(frozen=True)
class Services:
    admin_url: str  # a superuser URL on the server the tests create databases on
    vault_addr: str
    vault_token: str
    pgbouncer_port: int | None = None  # the PgBouncer lane's, in front of that server

    def pooled(self, url: str) -> str:
        """``url`` through the lane's PgBouncer (unchanged outside the lane)."""
        if self.pgbouncer_port is None:
            return url
        moved = parse_database_url(url).set(
            drivername="postgresql", host="127.0.0.1", port=self.pgbouncer_port
        )
        return moved.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    state_dir = Path(
        os.environ.get("TENANTVAULT_TEST_STATE_DIR") or tmp_path_factory.mktemp("devstack")
    )
    external = os.environ.get("TENANTVAULT_TEST_DATABASE_URL")
    try:
        environment = devstack.up(state_dir, postgres=external is None).variables
        admin_url = external or environment["TENANTVAULT_DATABASE_URL"]
        with psycopg.connect(admin_url, connect_timeout=10) as connection:
            connection.execute("SELECT 1")
        built = Services(admin_url, environment["VAULT_ADDR"], environment["VAULT_TOKEN"])
        if PGBOUNCER_LANE:
            built = _behind_pgbouncer(state_dir, built)
        yield built
    finally:
        devstack.reset(state_dir)


# What boto3 reads to reach the test AWS KMS (moto's server): its address, a region
# and credentials moto accepts (any, unless IAM enforcement is turned on).
AWS_TEST_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def aws_kms() -> Iterator[str]:
    """moto's AWS server on a free loopback port, started once, its address in
    AWS_ENDPOINT_URL (with a region and fake credentials) for the session: the AWS KMS
    the tests talk to over real HTTP. Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    environment = {**AWS_TEST_ENVIRONMENT, "AWS_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in environment}
    # Neither a profile nor a config file on this machine may change what boto3 uses.
    saved |= {name: os.environ.get(name) for name in ("AWS_PROFILE", "AWS_CONFIG_FILE")}
    os.environ.update(environment, AWS_CONFIG_FILE=os.devnull)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass(frozen=True)
class OAuthProvider:
    """The OAuth 2 / OpenID provider on loopback (oidc-provider-mock): ``url`` its base,
    ``token_url`` and ``authorize_url`` its endpoints, as a config names them."""

    url: str

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth2/token"

    @property
    def authorize_url(self) -> str:
        return f"{self.url}/oauth2/authorize"

    def revoke(self, user: str) -> None:
        """Revoke every token of ``user`` at the provider (the user withdrew consent)."""
        import requests

        requests.post(f"{self.url}/users/{user}/revoke-tokens", timeout=10).raise_for_status()


@pytest.fixture(scope="session")
def oauth_provider() -> Iterator[OAuthProvider]:
    """oidc-provider-mock on a free loopback port for the session, over real HTTP: any
    client id and secret, the code flow, refresh tokens. It rotates the refresh token
    on every refresh, as Microsoft's identity platform does (its authlib grant's
    INCLUDE_NEW_REFRESH_TOKEN, off by default)."""
    from oidc_provider_mock import _app, run_server_in_thread

    _app.RefreshTokenGrant.INCLUDE_NEW_REFRESH_TOKEN = True
    with run_server_in_thread() as server:
        yield OAuthProvider(f"http://localhost:{server.server_port}")


def _behind_pgbouncer(state_dir: Path, services: Services) -> Services:
    """``services`` with a PgBouncer in front of its PostgreSQL, checked to answer."""
    server = parse_database_url(services.admin_url)
    record = devstack.pgbouncer_up(
        state_dir,
        server_host=server.host or "127.0.0.1",
        server_port=server.port or 5432,
        logins=[server.username or "postgres", APP_LOGIN_ROLE],
    )
    pooled = Services(services.admin_url, services.vault_addr, services.vault_token, record.port)
    with psycopg.connect(pooled.pooled(services.admin_url), connect_timeout=10) as connection:
        connection.execute("SELECT 1")
    return pooled


def _with_database(url: str, name: str) -> str:
    url_object = parse_database_url(url).set(database=name, drivername="postgresql")
    return url_object.render_as_string(hide_password=False)


@pytest.fixture
def database_url(services: Services) -> Iterator[str]:
    """A new, empty database for one test, dropped afterwards."""
    name = f"tv_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(services.admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        if PGBOUNCER_LANE:  # the timeout the lane's connections do not send
            admin.execute(
                f'ALTER DATABASE "{name}" SET statement_timeout = {LANE_STATEMENT_TIMEOUT_MS}'
            )
    try:
        yield _with_database(services.admin_url, name)
    finally:
        with psycopg.connect(services.admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def settings(database_url: str, services: Services) -> Settings:
    return load_settings(
        database_url=database_url, VAULT_ADDR=services.vault_addr, VAULT_TOKEN=services.vault_token
    )


@pytest.fixture
def owner_engine(settings: Settings) -> Iterator[sa.Engine]:
    """The migration owner's engine (a superuser in tests: it bypasses RLS)."""
    engine = migration_engine(settings)
    yield engine
    engine.dispose()


# --- pytest-alembic ---


@pytest.fixture
def alembic_config() -> Config:
    return make_alembic_config(MigrationOptions())


@pytest.fixture
def alembic_engine(owner_engine: sa.Engine) -> sa.Engine:
    return owner_engine


# --- the application role ---


@pytest.fixture
def migrated(settings: Settings, services: Services) -> Settings:
    """The test database upgraded to the newest revision (straight on PostgreSQL); the
    settings returned reach it as operator jobs do (in the PgBouncer lane, through it)."""
    migrate.upgrade(settings)
    if services.pgbouncer_port is None:
        return settings
    return load_settings(
        database_url=services.pooled(settings.database_url.get_secret_value()),
        VAULT_ADDR=services.vault_addr,
        VAULT_TOKEN=services.vault_token,
    )


@pytest.fixture
def app_url(migrated: Settings, owner_engine: sa.Engine) -> str:
    """A URL that logs in as a member of the application role."""
    settings = migrated
    with owner_engine.begin() as connection:
        connection.exec_driver_sql(
            "DO $$ BEGIN\n"
            f"  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_LOGIN_ROLE}') THEN\n"
            f"    CREATE ROLE {APP_LOGIN_ROLE} LOGIN;\n"
            "  END IF;\n"
            "END $$"
        )
        connection.exec_driver_sql(f"GRANT {settings.app_role} TO {APP_LOGIN_ROLE}")
    url = settings.sqlalchemy_url.set(
        drivername="postgresql", username=APP_LOGIN_ROLE, password=None
    )
    return url.render_as_string(hide_password=False)


# --- the vault, against real PostgreSQL (as the application role) and real OpenBao ---


class CountingProvider:
    """Delegates to a real key provider, counting the calls that reach it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def generate_data_key(self, tenant_id: str) -> Any:
        self._count("generate")
        return self.inner.generate_data_key(tenant_id)

    @property
    def batch_size(self) -> int:
        return int(self.inner.batch_size)

    @property
    def ref(self) -> str:
        return str(self.inner.ref)

    def wrap(self, tenant_id: str, plaintext: bytes) -> Any:
        self._count("wrap")
        return self.inner.wrap(tenant_id, plaintext)

    def check_usable(self) -> None:
        self._count("check_usable")
        self.inner.check_usable()

    def unwrap(self, tenant_id: str, wrapped: str) -> bytes:
        self._count("unwrap")
        return bytes(self.inner.unwrap(tenant_id, wrapped))

    def unwrap_many(self, items: Any) -> Any:
        self._count("unwrap_many")
        return self.inner.unwrap_many(items)

    def rewrap(self, items: Any) -> Any:
        self._count("rewrap")
        return self.inner.rewrap(items)

    def rotate_kek(self) -> int:
        return int(self.inner.rotate_kek())

    def kek_version(self) -> int:
        return int(self.inner.kek_version())

    def min_decryption_version(self) -> int:
        return int(self.inner.min_decryption_version())

    def set_min_decryption_version(self, version: int) -> None:
        self.inner.set_min_decryption_version(version)

    def mac(self, message: bytes) -> str:
        self._count("mac")
        return str(self.inner.mac(message))

    def verify_mac(self, message: bytes, mac: str) -> bool:
        self._count("verify_mac")
        return bool(self.inner.verify_mac(message, mac))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def transit_provider(
    services: Services, *, key_name: str = "tenantvault-tests", **kwargs: Any
) -> Any:
    import hvac

    from tenantvault.kms.transit import TransitKeyProvider

    client = hvac.Client(url=services.vault_addr, token=services.vault_token, timeout=5)
    return TransitKeyProvider(client, key_name=key_name, **kwargs)


TENANTS = ("t_a", "t_b")


@pytest.fixture
def app_settings(app_url: str, owner_engine: sa.Engine, services: Services) -> Settings:
    """Settings as the application role, with tenants t_a and t_b present."""
    with owner_engine.begin() as connection:
        for tenant in TENANTS:
            connection.execute(
                sa.text("INSERT INTO dripiq_app.tenants (id, name) VALUES (:t, :t)"), {"t": tenant}
            )
    return load_settings(
        database_url=app_url, VAULT_ADDR=services.vault_addr, VAULT_TOKEN=services.vault_token
    )


@pytest.fixture
def provider(services: Services) -> CountingProvider:
    return CountingProvider(transit_provider(services))


@pytest.fixture
def vault(app_settings: Settings, provider: CountingProvider) -> Iterator[Any]:
    from tenantvault import Vault

    built = Vault.from_settings(app_settings, key_provider=provider)
    yield built
    built.dispose()


# --- operator jobs (rotation, shredding), as the migration owner ---


@pytest.fixture
def operator_db(migrated: Settings) -> Iterator[Any]:
    from tenantvault.db.operator import OperatorDatabase

    db = OperatorDatabase.from_settings(migrated)
    yield db
    db.dispose()


def fresh_keyring(provider: Any) -> Any:
    """A keyring with its own empty cache, as a separate rotate-keys process has."""
    from tenantvault.keys.cache import DataKeyCache
    from tenantvault.keys.keyring import Keyring

    return Keyring(provider, DataKeyCache(max_age_seconds=300, max_entries=4096, max_uses=10**9))


def child_environment(settings: Settings, services: Services) -> dict[str, str]:
    """The environment of a child process that uses ``settings``' database and the
    test OpenBao with the tests' transit key (no stray TENANTVAULT_/VAULT_ variables)."""
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("TENANTVAULT_", "VAULT_"))
    }
    environment.update(
        TENANTVAULT_DATABASE_URL=settings.database_url.get_secret_value(),
        VAULT_ADDR=services.vault_addr,
        VAULT_TOKEN=services.vault_token,
        TENANTVAULT_TRANSIT_KEY="tenantvault-tests",
    )
    if services.pgbouncer_port is not None:
        environment.update(PGBOUNCER_SETTINGS)
    return environment
