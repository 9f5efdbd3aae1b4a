"""Helpers shared by the database tests: catalog snapshots, legacy seed data, migrations."""

from __future__ import annotations

from typing import Any

import psycopg
import sqlalchemy as sa
from alembic import command

from tenantvault.db.migration_support import MigrationOptions
from tenantvault.ops.migrate import alembic_config, migration_engine
from tenantvault.settings import Settings

SCHEMA = "dripiq_app"

# What pytest-alembic cannot see: policies, RLS flags, triggers, index predicates,
# constraints, grants (table, column, schema), functions, column compression.
CATALOG_QUERIES = {
    "policies": """
        SELECT tablename, policyname, permissive, roles::text, cmd, qual, with_check
        FROM pg_policies WHERE schemaname = :schema""",
    "row_security": """
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = :schema AND c.relkind IN ('r', 'p')""",
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = :schema AND NOT t.tgisinternal""",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = :schema",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = :schema""",
    "table_grants": """
        SELECT table_name, grantee, privilege_type FROM information_schema.role_table_grants
        WHERE table_schema = :schema""",
    "column_grants": """
        SELECT table_name, column_name, grantee, privilege_type
        FROM information_schema.column_privileges WHERE table_schema = :schema""",
    # Effective privileges: a NULL acl means the owner's defaults, the same as granting them.
    "schema_acl": """
        SELECT a.grantee::regrole::text, a.privilege_type
        FROM pg_namespace n, aclexplode(COALESCE(n.nspacl, acldefault('n', n.nspowner))) a
        WHERE n.nspname = :schema""",
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns WHERE table_schema = :schema""",
    "compression": """
        SELECT c.relname, a.attname, a.attcompression::text
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = :schema AND a.attnum > 0 AND NOT a.attisdropped
          AND c.relkind = 'r' AND a.attcompression <> ''""",
    "functions": """
        SELECT p.proname, pg_get_functiondef(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = :schema""",
    "comments": """
        SELECT c.relname, a.attname, d.description
        FROM pg_description d JOIN pg_class c ON c.oid = d.objoid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.objsubid
        WHERE n.nspname = :schema AND d.classoid = 'pg_class'::regclass""",
}


def catalog_snapshot(
    connection: sa.Connection, schema: str = SCHEMA
) -> dict[str, list[tuple[Any, ...]]]:
    return {
        name: sorted(
            (tuple(row) for row in connection.execute(sa.text(query), {"schema": schema})),
            key=repr,
        )
        for name, query in CATALOG_QUERIES.items()
    }


def stamp(settings: Settings, revision: str) -> None:
    """Record ``revision`` as applied without running anything."""
    engine = migration_engine(settings)
    command.stamp(alembic_config(MigrationOptions(), connection=engine), revision)
    engine.dispose()


REVISIONS = [
    "0001_baseline",
    "0002_provider_tables",
    "0003_sender_identity_links",
    "0004_default_sendgrid_configs",
    "0005_tenant_data_keys",
    "0006_load_credentials_function",
    "0007_config_versions",
    "0008_audit_and_lifecycle",
    "0009_sealed_bindings",
    "0010_no_inherited_privileges",
    "0011_load_oauth_token_function",
    "0012_usable_data_keys_function",
    "0013_open_config_bound_tokens",
    "0014_grants_record_targets",
    "0015_replay_guards_and_claims",
    "0016_function_search_paths",
    "0017_lean_hot_functions",
    "0018_kek_references",
    "0019_oauth_reconsent",
]


def seed_legacy(connection: sa.Connection) -> None:
    """Tenants, users and sender identities as the deployed application has them.

    acme: two SendGrid senders and one without a SendGrid id; globex: no SendGrid
    sender; initech: one SendGrid sender.
    """
    connection.execute(
        sa.text(
            """
            INSERT INTO dripiq_app.tenants (id, name, created_at, updated_at) VALUES
              ('t_acme', 'Acme', '2024-01-02 03:04:05', '2024-02-03 04:05:06'),
              ('t_globex', 'Globex', '2024-01-02 03:04:05', '2024-01-02 03:04:05'),
              ('t_initech', 'Initech', '2024-01-02 03:04:05', '2024-01-02 03:04:05');
            INSERT INTO dripiq_app.users (id, supabase_id, email, name) VALUES
              ('u_1', 'sb_1', 'ann@acme.test', 'Ann'),
              ('u_2', 'sb_2', 'bob@globex.test', NULL),
              ('u_3', 'sb_3', 'cy@initech.test', 'Cy');
            INSERT INTO dripiq_app.email_sender_identities
              (id, tenant_id, user_id, from_email, from_name, domain, sendgrid_sender_id,
               validation_status, last_validated_at, dedicated_ip_pool, email_signature,
               is_default, created_at, updated_at) VALUES
              ('s_acme_1', 't_acme', 'u_1', 'ann@acme.test', 'Ann', 'acme.test', 'sg-101',
               'verified', '2024-03-01 00:00:00', 'pool-a', '<p>Ann</p>', true,
               '2024-01-05 00:00:00', '2024-03-01 00:00:00'),
              ('s_acme_2', 't_acme', 'u_1', 'sales@acme.test', 'Sales', 'acme.test', 'sg-102',
               'pending', NULL, NULL, NULL, false, '2024-01-06 00:00:00', '2024-01-06 00:00:00'),
              ('s_acme_3', 't_acme', 'u_1', 'noreply@acme.test', 'No reply', 'acme.test', NULL,
               'failed', NULL, NULL, NULL, false, '2024-01-07 00:00:00', '2024-01-07 00:00:00'),
              ('s_globex_1', 't_globex', 'u_2', 'bob@globex.test', 'Bob', 'globex.test', NULL,
               'pending', NULL, NULL, NULL, true, '2024-01-08 00:00:00', '2024-01-08 00:00:00'),
              ('s_initech_1', 't_initech', 'u_3', 'cy@initech.test', 'Cy', 'initech.test', 'sg-301',
               'verified', NULL, NULL, NULL, true, '2024-01-09 00:00:00', '2024-01-09 00:00:00');
            """
        )
    )


LEGACY_COLUMNS = {
    "tenants": "id, name, created_at, updated_at",
    "users": "id, supabase_id, email, name, avatar, created_at, updated_at",
    "email_sender_identities": (
        "id, tenant_id, user_id, from_email, from_name, domain, sendgrid_sender_id, "
        "validation_status, last_validated_at, dedicated_ip_pool, email_signature, "
        "is_default, created_at, updated_at"
    ),
}


def legacy_rows(connection: sa.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table: [
            tuple(row)
            for row in connection.execute(
                sa.text(f"SELECT {columns} FROM dripiq_app.{table} ORDER BY id")
            )
        ]
        for table, columns in LEGACY_COLUMNS.items()
    }


def table_rows(connection: sa.Connection, table: str) -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in connection.execute(sa.text(f"SELECT * FROM dripiq_app.{table} ORDER BY id"))
    ]


class PsqlError(Exception):
    """psql stopped at an error (ON_ERROR_STOP); the message is its stderr."""


def run_psql(database_url: str, sql: str) -> None:
    """Run a script the way a DBA does: psql -f, stopping at the first error."""
    import subprocess

    from tenantvault.dev.stack import postgres_bin_dir

    result = subprocess.run(
        [str(postgres_bin_dir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", database_url],
        input=sql,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise PsqlError(result.stderr)


def terminate_app_backends(owner_engine: sa.Engine) -> int:
    """Terminate the test app login's backends in this database, as a restart does."""
    with owner_engine.connect() as connection:
        return len(
            connection.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE usename = 'tenantvault_test_app_login' AND datname = current_database()"
                )
            ).all()
        )


def app_login_connections(owner_engine: sa.Engine, pgbouncer_port: int | None) -> int:
    """How many connections the test app login has open to this database: its backends,
    or in the PgBouncer lane (``pgbouncer_port``) its clients of PgBouncer, whose server
    connections stay pooled after their clients close."""
    if pgbouncer_port is None:
        with owner_engine.connect() as connection:
            return int(
                connection.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND usename = 'tenantvault_test_app_login'"
                    )
                ).scalar_one()
            )
    database = owner_engine.url.database
    console = f"postgresql://{owner_engine.url.username}@127.0.0.1:{pgbouncer_port}/pgbouncer"
    with psycopg.connect(console, autocommit=True) as admin:
        clients = admin.execute("SHOW CLIENTS").fetchall()  # the console's own protocol
    # (type, user, database, ...): SHOW CLIENTS' first columns.
    return sum(1 for row in clients if row[1:3] == ("tenantvault_test_app_login", database))


# What migration 0013 records each older-format value beside (its ``_bound``): the row id
# in the value's associated data, the text it sat beside, and where both are read.
_CONFIGS = "dripiq_app.email_provider_configs"
_BY_CONFIG = f"JOIN {_CONFIGS} c ON c.tenant_id = t.tenant_id AND c.id = t.config_id"
LEGACY_RECORD = {
    ("email_provider_configs", "encrypted_credentials"): (
        "t.id",
        "t.type || ':' || t.version || ':' || t.config::text",
        f"{_CONFIGS} t",
    ),
    **{
        ("email_provider_tokens", column): (
            "t.config_id",
            "t.id || ':' || t.version || ':' || c.type || ':' || c.config::text",
            f"dripiq_app.email_provider_tokens t {_BY_CONFIG}",
        )
        for column in ("encrypted_access_token", "encrypted_refresh_token")
    },
    ("email_provider_config_versions", "encrypted_credentials"): (
        "t.config_id || ':' || t.version",
        "c.type || ':' || t.version || ':' || t.config::text",
        f"dripiq_app.email_provider_config_versions t {_BY_CONFIG}",
    ),
}


def record_as_the_upgrade(owner_engine: sa.Engine, tenant_id: str) -> None:
    """Record ``tenant_id``'s older-format values as migration 0013's upgrade records
    what it finds: a test that writes such values after the upgrade stands for a
    database upgraded with them in it (tests/migrations/test_data.py upgrades one for
    real). The owner writes as the tenant (row-level security is forced on it too)."""
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text("SELECT set_config('tenantvault.tenant_id', :t, true)"), {"t": tenant_id}
        )
        for (table, column), (row_id, bound, source) in LEGACY_RECORD.items():
            connection.execute(
                sa.text(
                    "INSERT INTO dripiq_app.tenantvault_legacy_values (tenant_id, table_name, "
                    "column_name, row_id, value_sha256, bound_sha256) "
                    f"SELECT t.tenant_id, '{table}', '{column}', {row_id}, "
                    f"sha256(convert_to(t.{column}, 'UTF8')), sha256(convert_to({bound}, 'UTF8')) "
                    f"FROM {source} WHERE t.tenant_id = :t AND t.{column} IS NOT NULL "
                    f"AND NOT starts_with(t.{column}, 'tv3.') ON CONFLICT DO NOTHING"
                ),
                {"t": tenant_id},
            )


def write_as_app(app_url: str, statement: str, **params: object) -> None:
    """One transaction as the application's own login, scoped to t_a: as an SQL injection
    or a leaked application login would write."""
    with psycopg.connect(app_url, autocommit=False) as connection:
        connection.execute("SELECT set_config('tenantvault.tenant_id', 't_a', true)")
        connection.execute(statement, params)
        connection.commit()
