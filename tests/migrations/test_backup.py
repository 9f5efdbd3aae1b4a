"""Backup and restore as docs/backup.md says, with real pg_dump, pg_restore and OpenBao.

Roles as in production: a DBA (the test's superuser) makes the roles once; the backup
login (LOGIN BYPASSRLS, member of pg_read_all_data, nothing else) dumps; the migration
owner (no superuser, no BYPASSRLS, bound by FORCE ROW LEVEL SECURITY) restores into a
fresh database; the application's login opens every secret from the restored copy
through a fresh ``Vault`` whose transit key was itself restored from its backup.
The naive dump (as the owner) is shown to fail, so this test fails if the procedure
is replaced by it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import psycopg
import pytest
import sqlalchemy as sa

from tenantvault import Vault
from tenantvault.dev.stack import postgres_bin_dir
from tenantvault.errors import TenantVaultError
from tenantvault.ops import migrate
from tenantvault.ops.jobs import audit_partitions_job, audit_verify_job
from tenantvault.settings import Settings, load_settings, parse_database_url
from tenantvault.vault.providers import credentials_to_json
from tests.conftest import APP_LOGIN_ROLE, TENANTS, Services, transit_provider
from tests.support import catalog_snapshot

OWNER = "tenantvault_test_backup_owner"  # the migration owner
BACKUP = "tenantvault_test_backup"  # the backup login of docs/backup.md (pg_read_all_data)
BACKUP_NARROW = "tenantvault_test_backup_narrow"  # its variant with grants on the schema only
# What the owner grants the narrow variant (docs/backup.md, "On a shared cluster").
NARROW_GRANTS = (
    f"GRANT USAGE ON SCHEMA dripiq_app TO {BACKUP_NARROW}",
    f"GRANT SELECT ON ALL TABLES IN SCHEMA dripiq_app TO {BACKUP_NARROW}",
    f"GRANT SELECT ON ALL SEQUENCES IN SCHEMA dripiq_app TO {BACKUP_NARROW}",
    f"ALTER DEFAULT PRIVILEGES IN SCHEMA dripiq_app GRANT SELECT ON TABLES TO {BACKUP_NARROW}",
    f"ALTER DEFAULT PRIVILEGES IN SCHEMA dripiq_app GRANT SELECT ON SEQUENCES TO {BACKUP_NARROW}",
)
SCHEMA = "dripiq_app"


def _url(base: str, *, user: str, database: str) -> str:
    url = parse_database_url(base).set(drivername="postgresql", username=user, password=None)
    return url.set(database=database).render_as_string(hide_password=False)


def _server_major(admin_url: str) -> int:
    with psycopg.connect(admin_url) as connection:
        row = connection.execute("SHOW server_version_num").fetchone()
    assert row is not None
    return int(row[0]) // 10000


def _client_bin_dir(major: int) -> Path:
    """pg_dump and pg_restore of the server's major version (docs/backup.md: pg_restore 17+
    writes ``SET transaction_timeout``, which an older server refuses, and an older
    pg_restore cannot read a newer archive)."""
    for candidate in (postgres_bin_dir(), Path(f"/usr/lib/postgresql/{major}/bin")):
        found = _run([str(candidate / "pg_dump"), "--version"], check=False)
        if found.returncode == 0 and f" {major}." in found.stdout:
            return candidate
    raise AssertionError(f"no pg_dump of PostgreSQL {major} on this machine")


def _run(
    args: list[str], *, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    except FileNotFoundError as exc:
        return subprocess.CompletedProcess(args, 127, "", str(exc))
    if check:
        assert done.returncode == 0, (args[0], done.returncode, done.stderr)
    return done


def _dba(admin_url: str, *statements: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as connection:
        for statement in statements:
            connection.execute(statement)


@dataclass
class Cluster:
    admin_url: str  # the DBA (superuser), only for the one-time role setup and test checks
    major: int
    bin: Path
    vault_addr: str
    vault_token: str
    transit_key: str
    backup_role: str

    def owner_url(self, database: str) -> str:
        return _url(self.admin_url, user=OWNER, database=database)

    def backup_url(self, database: str) -> str:
        return _url(self.admin_url, user=self.backup_role, database=database)

    def app_url(self, database: str) -> str:
        return _url(self.admin_url, user=APP_LOGIN_ROLE, database=database)

    def admin_on(self, database: str) -> str:
        return _url(
            self.admin_url,
            user=parse_database_url(self.admin_url).username or "",
            database=database,
        )

    def owner_settings(self, database: str) -> Settings:
        return load_settings(
            database_url=self.owner_url(database),
            VAULT_ADDR=self.vault_addr,
            VAULT_TOKEN=self.vault_token,
            TENANTVAULT_TRANSIT_KEY=self.transit_key,
        )

    def vault(self, database: str, **provider: Any) -> Vault:
        """A new Vault as the application's login: its own engine, key provider and cache."""
        settings = load_settings(
            database_url=self.app_url(database),
            VAULT_ADDR=self.vault_addr,
            VAULT_TOKEN=self.vault_token,
        )
        services = Services(self.admin_url, self.vault_addr, self.vault_token)
        key_provider = transit_provider(services, key_name=self.transit_key, **provider)
        return Vault.from_settings(settings, key_provider=key_provider)

    def create_database(self, name: str) -> None:
        # The DBA makes an empty database the owner may create its schema in
        # (docs/backup.md, "Restore"), and takes CREATE back once it is restored.
        _dba(
            self.admin_url,
            f'CREATE DATABASE "{name}"',
            f'GRANT CREATE ON DATABASE "{name}" TO {OWNER}',
        )

    def restored_by_the_owner(self, name: str) -> None:
        _dba(self.admin_url, f'REVOKE CREATE ON DATABASE "{name}" FROM {OWNER}')

    def drop_database(self, name: str) -> None:
        _dba(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def transit(services: Services) -> Iterator[tuple[hvac.Client, str]]:
    """A transit key made as SECURITY.md says (derived), then opened to backups as
    docs/backup.md says (exportable and allow_plaintext_backup: irreversible)."""
    client = hvac.Client(url=services.vault_addr, token=services.vault_token, timeout=5)
    name = f"tenantvault-backup-{uuid.uuid4().hex[:8]}"
    client.secrets.transit.create_key(name, derived=True)
    with pytest.raises(hvac.exceptions.VaultError, match="exporting is disallowed"):
        client.secrets.transit.backup_key(name)  # refused until the key allows it
    client.secrets.transit.update_key_configuration(
        name, exportable=True, allow_plaintext_backup=True
    )
    # Irreversible: turning them off is accepted and ignored.
    client.secrets.transit.update_key_configuration(
        name, exportable=False, allow_plaintext_backup=False
    )
    settings = client.secrets.transit.read_key(name)["data"]
    assert (settings["exportable"], settings["allow_plaintext_backup"]) == (True, True)
    yield client, name
    client.secrets.transit.update_key_configuration(name, deletion_allowed=True)
    client.secrets.transit.delete_key(name)


@pytest.fixture
def cluster(
    services: Services, transit: tuple[hvac.Client, str], request: pytest.FixtureRequest
) -> Cluster:
    """The roles of docs/backup.md, made by the DBA once per cluster. Parametrized
    (indirectly) with the backup login: BACKUP (pg_read_all_data) or BACKUP_NARROW."""
    backup_role = getattr(request, "param", BACKUP)
    major = _server_major(services.admin_url)
    # The owner's memberships as docs/migration-guide.md, step 2, makes them: never
    # inheriting (on 15 the owner role itself is NOINHERIT).
    inherit = " WITH INHERIT FALSE" if major >= 16 else ""
    statements = [
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
        f"THEN CREATE ROLE {role}; END IF; END $$"
        for role in ("tenantvault_app", "tenantvault_migrator", OWNER, APP_LOGIN_ROLE, backup_role)
    ]
    statements += [
        f"ALTER ROLE {OWNER} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB",
        f"ALTER ROLE {APP_LOGIN_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS",
        *([] if major >= 16 else [f"ALTER ROLE {OWNER} NOINHERIT"]),
        f"GRANT tenantvault_migrator, tenantvault_app TO {OWNER}{inherit}",
        f"GRANT tenantvault_app TO {APP_LOGIN_ROLE}",
        # The backup login: reads everything, bypasses RLS, may write nothing.
        f"ALTER ROLE {backup_role} LOGIN NOSUPERUSER BYPASSRLS NOCREATEROLE NOCREATEDB",
    ]
    if backup_role == BACKUP:
        statements.append(f"GRANT pg_read_all_data TO {BACKUP}")
    _dba(services.admin_url, *statements)
    return Cluster(
        services.admin_url,
        major,
        _client_bin_dir(major),
        services.vault_addr,
        services.vault_token,
        transit[1],
        backup_role,
    )


@pytest.fixture
def source(cluster: Cluster) -> Iterator[str]:
    """A migrated database owned by the (non-superuser) migration owner."""
    name = f"tv_backup_src_{uuid.uuid4().hex[:10]}"
    cluster.create_database(name)
    try:
        migrate.upgrade(cluster.owner_settings(name))
        with psycopg.connect(cluster.owner_url(name), autocommit=True) as owner:
            for tenant in TENANTS:
                owner.execute(
                    "INSERT INTO dripiq_app.tenants (id, name) VALUES (%s, %s)", (tenant, tenant)
                )
            if cluster.backup_role == BACKUP_NARROW:
                for statement in NARROW_GRANTS:
                    owner.execute(statement)
        yield name
    finally:
        cluster.drop_database(name)


@pytest.fixture
def restored(cluster: Cluster) -> Iterator[str]:
    name = f"tv_backup_dst_{uuid.uuid4().hex[:10]}"
    cluster.create_database(name)
    try:
        yield name
    finally:
        cluster.drop_database(name)


SMTP = {
    "host": "smtp.acme.example",
    "port": 587,
    "secure": False,
    "auth_type": "login",
    "user": "m@acme.example",
}
GRAPH = {
    "azure_tenant_id": "contoso.onmicrosoft.com",
    "client_id": "4a1aa1d5-c567-49d0-ad0b-cd957a47f842",
    "auth_type": "delegated",
    "scopes": ["https://graph.microsoft.com/Mail.Send", "offline_access"],
}


def _write(vault: Vault) -> dict[tuple[str, ...], Any]:
    """Two tenants' credentials (with history), OAuth tokens and usage; returns every secret."""
    stored: dict[tuple[str, ...], Any] = {}
    for tenant in TENANTS:
        smtp = vault.create_config(
            tenant,
            type="smtp",
            name="Relay",
            config=SMTP,
            credentials={"password": f"first-{tenant}"},
            is_default=True,
        )
        vault.store_credentials(tenant, smtp.id, {"password": f"second-{tenant}"}, reason="rotated")
        stored[(tenant, smtp.id, "v1")] = {"password": f"first-{tenant}"}
        stored[(tenant, smtp.id, "v2")] = {"password": f"second-{tenant}"}
        stored[(tenant, smtp.id, "live")] = {"password": f"second-{tenant}"}
        sendgrid = vault.create_config_from_template(
            tenant,
            "sendgrid",
            name="SendGrid",
            credentials={"api_key": f"SG.{tenant}-key-id.{uuid.uuid4().hex}"},
        )
        stored[(tenant, sendgrid.id, "live")] = credentials_to_json(
            vault.load_credentials(tenant, sendgrid.id)
        )
        stored[(tenant, sendgrid.id, "v1")] = stored[(tenant, sendgrid.id, "live")]
        graph = vault.create_config(tenant, type="microsoft_graph", name="Mailbox", config=GRAPH)
        expires = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
        vault.store_oauth_token(
            tenant,
            graph.id,
            access_token=f"access-{tenant}",
            refresh_token=f"refresh-{tenant}",
            expires_at=expires,
            scopes=GRAPH["scopes"],
        )
        stored[(tenant, graph.id, "token")] = (f"access-{tenant}", f"refresh-{tenant}", expires)
        vault.record_usage(tenant, smtp.id, sent=3)
    return stored


def _open_all(vault: Vault) -> dict[tuple[str, ...], Any]:
    """Every secret the vault holds, opened (live credentials, each kept version, tokens)."""
    opened: dict[tuple[str, ...], Any] = {}
    for tenant in TENANTS:
        for config in vault.list_active_configs(tenant):
            if config.type == "microsoft_graph":
                token = vault.load_oauth_token(tenant, config.id)
                assert token.access_token is not None
                assert token.refresh_token is not None
                opened[(tenant, config.id, "token")] = (
                    token.access_token.get_secret_value(),
                    token.refresh_token.get_secret_value(),
                    token.expires_at,
                )
                continue
            opened[(tenant, config.id, "live")] = credentials_to_json(
                vault.load_credentials(tenant, config.id)
            )
            for kept in vault.list_config_versions(tenant, config.id):
                version = vault.get_config_version(
                    tenant, config.id, kept.version, with_credentials=True
                )
                assert version.credentials is not None
                opened[(tenant, config.id, f"v{kept.version}")] = credentials_to_json(
                    version.credentials
                )
    return opened


def _tables(admin_url: str) -> list[str]:
    """Every table of the schema (partitioned parents, partitions, plain tables)."""
    with psycopg.connect(admin_url) as connection:
        rows = connection.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1",
            (SCHEMA,),
        ).fetchall()
    return [r[0] for r in rows]


def _contents(admin_url: str) -> dict[str, list[str]]:
    """Every row of every table, read by the DBA (a superuser sees past RLS)."""
    with psycopg.connect(admin_url) as connection:
        return {
            table: sorted(
                repr(row)
                for row in connection.execute(f'SELECT * FROM ONLY {SCHEMA}."{table}"').fetchall()
            )
            for table in _tables(admin_url)
        }


def _catalog(admin_url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = sa.create_engine(parse_database_url(admin_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as connection:
            return catalog_snapshot(connection)
    finally:
        engine.dispose()


def _cli(cluster: Cluster, database: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENANTVAULT_", "VAULT_"))}
    env.update(
        TENANTVAULT_DATABASE_URL=cluster.owner_url(database),
        VAULT_ADDR=cluster.vault_addr,
        VAULT_TOKEN=cluster.vault_token,
        TENANTVAULT_TRANSIT_KEY=cluster.transit_key,
    )
    return _run([sys.executable, "-m", "tenantvault.cli", *args], check=False, env=env)


@pytest.mark.parametrize("cluster", [BACKUP, BACKUP_NARROW], indirect=True)
def test_backup_and_restore_as_documented_opens_every_secret_and_keeps_the_audit_chains(
    cluster: Cluster,
    source: str,
    restored: str,
    transit: tuple[hvac.Client, str],
    tmp_path: Path,
) -> None:
    writer = cluster.vault(source)
    try:
        stored = _write(writer)
        assert _open_all(writer) == stored
    finally:
        writer.dispose()
    heads = tmp_path / "heads.json"
    before = _cli(cluster, source, "audit", "verify", "--heads-out", str(heads))
    assert before.returncode == 0, before.stderr
    source_heads = json.loads(heads.read_text())
    assert set(source_heads) == set(TENANTS)
    # Partitions made after the backup login's grants (as `audit partitions` makes them
    # yearly) are dumped too: pg_read_all_data covers them, the narrow variant's
    # default privileges give them SELECT.
    assert audit_partitions_job(cluster.owner_settings(source), months_ahead=30) == 6

    # 1. The dump, as the backup login (docs/backup.md, "Back up the database").
    dump = tmp_path / "tenantvault.dump"
    started = time.monotonic()
    _run(
        [
            str(cluster.bin / "pg_dump"),
            "--format=custom",
            "--file",
            str(dump),
            "--dbname",
            cluster.backup_url(source),
        ]
    )
    dump_seconds = time.monotonic() - started
    # 2. The transit key's backup (docs/backup.md, "Back up the transit keys").
    client, key = transit
    key_backup = client.secrets.transit.backup_key(key)["data"]["backup"]
    assert key_backup

    # A restore never overwrites a key of that name unless forced.
    with pytest.raises(hvac.exceptions.VaultError, match="already exists"):
        client.secrets.transit.restore_key(key_backup, name=key)
    # The transit key is lost (a new Vault cluster): nothing opens any more...
    client.secrets.transit.update_key_configuration(key, deletion_allowed=True)
    client.secrets.transit.delete_key(key)
    lost = cluster.vault(source, create_key=False)
    try:
        with pytest.raises(TenantVaultError):
            lost.load_credentials(TENANTS[0], next(iter(stored))[1])
    finally:
        lost.dispose()
    # 3. ...until its backup is restored (docs/backup.md, "Restore the transit keys").
    client.secrets.transit.restore_key(key_backup, name=key)

    # 4. Restore, as the migration owner, into the fresh database the DBA made.
    started = time.monotonic()
    _run(
        [
            str(cluster.bin / "pg_restore"),
            "--exit-on-error",
            "--single-transaction",
            "--dbname",
            cluster.owner_url(restored),
            str(dump),
        ]
    )
    restore_seconds = time.monotonic() - started
    cluster.restored_by_the_owner(restored)
    print(
        f"\nPostgreSQL {cluster.major}: dump {dump.stat().st_size} bytes in {dump_seconds:.2f} s, "
        f"restore in {restore_seconds:.2f} s"
    )

    # Every secret opens through a fresh Vault on the restored database, as stored.
    reader = cluster.vault(restored, create_key=False)
    try:
        assert _open_all(reader) == stored
    finally:
        reader.dispose()

    # Every row of every table (partitions, chain heads, alembic_version) came back,
    # and so did the schema: RLS enabled and forced, policies, triggers, grants.
    source_rows = _contents(cluster.admin_on(source))
    restored_rows = _contents(cluster.admin_on(restored))
    assert restored_rows == source_rows
    assert {t: len(r) for t, r in restored_rows.items()} == {
        t: len(r) for t, r in source_rows.items()
    }
    for table in (
        "email_provider_configs",
        "email_provider_config_versions",
        "email_provider_tokens",
        "tenant_data_keys",
        "email_provider_usage",
        "audit_chain_heads",
        "alembic_version",
    ):
        assert restored_rows[table], table
    assert sum(len(r) for t, r in restored_rows.items() if t.startswith("audit_events_")) > 0
    assert _catalog(cluster.admin_on(restored)) == _catalog(cluster.admin_on(source))

    # The audit chains verify, and end where they ended before the backup.
    report = audit_verify_job(cluster.owner_settings(restored))
    assert report.ok
    assert report.tenants == len(TENANTS)
    assert report.events > 0
    after = _cli(cluster, restored, "audit", "verify", "--expect-heads", str(heads))
    assert after.returncode == 0, after.stderr

    # The restored database works: the app sees nothing without a tenant, a new
    # write extends the chain (its trigger came back after the data), verify passes.
    with psycopg.connect(cluster.app_url(restored)) as app:
        row = app.execute("SELECT count(*) FROM dripiq_app.email_provider_configs").fetchone()
        assert row == (0,)
    writer = cluster.vault(restored)
    try:
        config = writer.get_config_by_name(TENANTS[0], "Relay")
        writer.store_credentials(TENANTS[0], config.id, {"password": "third"})
        opened = writer.load_credentials(TENANTS[0], config.id)
        assert credentials_to_json(opened) == {"password": "third"}
    finally:
        writer.dispose()
    report = audit_verify_job(cluster.owner_settings(restored))
    assert report.ok
    assert report.heads[TENANTS[0]].seq == source_heads[TENANTS[0]]["seq"] + 1


def test_the_naive_dump_as_the_owner_fails_or_dumps_no_tenant_rows(
    cluster: Cluster, source: str, tmp_path: Path
) -> None:
    """Why docs/backup.md needs a backup login: the owner is bound by FORCE RLS."""
    writer = cluster.vault(source)
    try:
        _write(writer)
    finally:
        writer.dispose()
    pg_dump = str(cluster.bin / "pg_dump")
    naive = _run(
        [
            pg_dump,
            "--format=custom",
            "--file",
            str(tmp_path / "naive.dump"),
            "--dbname",
            cluster.owner_url(source),
        ],
        check=False,
    )
    assert naive.returncode != 0
    assert "query would be affected by row-level security policy" in naive.stderr

    # With --enable-row-security the owner's policies apply, and its membership in the
    # migrator role does not inherit (WITH INHERIT FALSE; on 15 the owner is NOINHERIT),
    # so no tenant row is dumped, and the dump exits 0: a backup that looks fine.
    plain = _run([pg_dump, "--enable-row-security", "--dbname", cluster.owner_url(source)])
    dumped = _copied_rows(plain.stdout)
    for table in (
        "email_provider_configs",
        "email_provider_config_versions",
        "email_provider_tokens",
        "tenant_data_keys",
    ):
        assert dumped[table] == [], table

    # Dumping as the migrator role (SET ROLE from the owner) is refused: the migrator
    # may not read alembic_version, the application's tables or the audit partitions.
    as_migrator = _run(
        [
            pg_dump,
            "--role=tenantvault_migrator",
            "--enable-row-security",
            "--format=custom",
            "--file",
            str(tmp_path / "m.dump"),
            "--dbname",
            cluster.owner_url(source),
        ],
        check=False,
    )
    assert as_migrator.returncode != 0
    assert "permission denied" in as_migrator.stderr


def _copied_rows(script: str) -> dict[str, list[str]]:
    """The data lines of each COPY in a plain-format dump, by table name."""
    rows: dict[str, list[str]] = {}
    current: str | None = None
    for line in script.splitlines():
        if current is None and line.startswith(f"COPY {SCHEMA}."):
            current = line.split()[1].split(".", 1)[1]
            rows[current] = []
        elif current is not None:
            if line == "\\.":
                current = None
            else:
                rows[current].append(line)
    return rows


def test_the_roles_script_recreates_the_documented_roles(cluster: Cluster) -> None:
    """docs/backup.md, "Roles": pg_dumpall --roles-only (the DBA) carries the backup
    login's BYPASSRLS and pg_read_all_data and the owner's non-inheriting membership."""
    script = _run(
        [
            str(cluster.bin / "pg_dumpall"),
            "--roles-only",
            "--no-role-passwords",
            "--dbname",
            cluster.admin_url,
        ]
    ).stdout
    lines = script.splitlines()
    assert any(
        line.startswith(f"ALTER ROLE {BACKUP} WITH") and " LOGIN " in line and " BYPASSRLS" in line
        for line in lines
    )
    assert any(line.startswith(f"GRANT pg_read_all_data TO {BACKUP}") for line in lines)
    (membership,) = [x for x in lines if x.startswith(f"GRANT tenantvault_migrator TO {OWNER}")]
    assert ("WITH INHERIT FALSE" in membership) is (cluster.major >= 16)
    assert "CREATE ROLE tenantvault_app;" in lines
