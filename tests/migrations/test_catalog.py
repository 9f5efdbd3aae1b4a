"""What pytest-alembic cannot see: policies, RLS flags, triggers, index predicates,
constraints, grants, functions and compression, compared through the catalogs."""

from __future__ import annotations

from itertools import pairwise

import sqlalchemy as sa

from tenantvault.db.migration_support import MigrationOptions
from tenantvault.db.models import TENANTVAULT_TABLES
from tenantvault.ops import migrate
from tenantvault.settings import Settings
from tests.support import REVISIONS, catalog_snapshot, run_psql

DATA_ONLY_REVISIONS = {"0004_default_sendgrid_configs"}


def _snapshot(engine: sa.Engine) -> dict[str, list[tuple[object, ...]]]:
    with engine.connect() as connection:
        return catalog_snapshot(connection)


def test_each_revision_downgrade_restores_the_catalog_exactly(
    settings: Settings, owner_engine: sa.Engine
) -> None:
    migrate.upgrade(settings, REVISIONS[0])
    for previous, revision in pairwise(REVISIONS):
        before = _snapshot(owner_engine)
        migrate.upgrade(settings, revision)
        after_upgrade = _snapshot(owner_engine)
        if revision not in DATA_ONLY_REVISIONS:
            assert after_upgrade != before, f"{revision} changed nothing the catalog shows"
        migrate.downgrade(settings, previous)
        assert _snapshot(owner_engine) == before, f"downgrade of {revision} left a trace"
        migrate.upgrade(settings, revision)
        assert _snapshot(owner_engine) == after_upgrade, f"{revision} is not repeatable"


def test_full_round_trip_from_the_baseline_restores_the_catalog(
    settings: Settings, owner_engine: sa.Engine
) -> None:
    migrate.upgrade(settings, REVISIONS[0])
    at_baseline = _snapshot(owner_engine)
    migrate.upgrade(settings)
    migrate.downgrade(settings, REVISIONS[0])
    assert _snapshot(owner_engine) == at_baseline


def test_every_owned_table_has_forced_row_level_security_and_its_policies(
    settings: Settings, owner_engine: sa.Engine
) -> None:
    migrate.upgrade(settings)
    snapshot = _snapshot(owner_engine)
    flags = {name: (rls, forced) for name, rls, forced in snapshot["row_security"]}
    policies = {
        (table, name): (roles, qual, check)
        for table, name, _, roles, _, qual, check in snapshot["policies"]
    }
    for table in TENANTVAULT_TABLES:
        assert flags[table] == (True, True), f"{table}: RLS not enabled and forced"
        roles, qual, check = policies[(table, "tenant_isolation")]
        assert roles == "{public}"
        assert qual == check
        assert "NULLIF(current_setting('tenantvault.tenant_id'::text, true), ''::text)" in qual
        assert "deleted_at" not in qual  # a soft-deleted row stays the tenant's
        assert policies[(table, "migrator_all_tenants")][0] == "{tenantvault_migrator}"
    # The application's own tables stay without RLS: their other readers set no tenant.
    for table in ("tenants", "users", "email_sender_identities"):
        assert flags[table] == (False, False)


def test_owned_tables_keep_updated_at_with_a_trigger(
    settings: Settings, owner_engine: sa.Engine
) -> None:
    migrate.upgrade(settings)
    triggers = {(table, name) for table, name, _ in _snapshot(owner_engine)["triggers"]}
    for table in TENANTVAULT_TABLES:
        if table == "audit_events":
            continue  # append-only: its triggers refuse updates (tests/audit/test_audit.py)
        assert (table, f"trg_{table}_touch_updated_at") in triggers


def test_every_new_table_and_column_has_a_comment(
    settings: Settings, owner_engine: sa.Engine
) -> None:
    migrate.upgrade(settings)
    with owner_engine.connect() as connection:
        missing = connection.execute(
            sa.text(
                """
                SELECT c.relname, a.attname FROM pg_attribute a
                JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = 'dripiq_app' AND a.attnum > 0 AND NOT a.attisdropped
                  AND (c.relname = ANY(:tables) OR (c.relname = 'email_sender_identities'
                       AND a.attname IN ('provider_config_id', 'provider_validation_data')))
                  AND col_description(c.oid, a.attnum) IS NULL
                """
            ),
            {"tables": list(TENANTVAULT_TABLES)},
        ).all()
        uncommented_tables = connection.execute(
            sa.text(
                "SELECT t FROM unnest(CAST(:tables AS text[])) t "
                "WHERE obj_description(to_regclass('dripiq_app.' || t), 'pg_class') IS NULL"
            ),
            {"tables": list(TENANTVAULT_TABLES)},
        ).all()
    assert missing == []
    assert uncommented_tables == []


def test_jsonb_and_sealed_columns_use_lz4_where_the_server_has_it(
    settings: Settings, owner_engine: sa.Engine
) -> None:
    migrate.upgrade(settings)
    with owner_engine.connect() as connection:
        has_lz4 = connection.execute(
            sa.text(
                "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
            )
        ).scalar_one()
        compression = {(t, c): m for t, c, m in catalog_snapshot(connection)["compression"]}
    expected = {
        ("email_provider_configs", "config"),
        ("email_provider_configs", "encrypted_credentials"),
        ("email_provider_config_versions", "config"),
        ("email_provider_config_versions", "encrypted_credentials"),
        ("email_provider_tokens", "encrypted_access_token"),
        ("email_provider_tokens", "encrypted_refresh_token"),
        ("email_sender_identities", "provider_validation_data"),
    }
    if has_lz4:
        assert {key: "l" for key in expected} == compression
    else:
        assert compression == {}


def test_offline_sql_builds_the_same_schema_as_online_migration(
    settings: Settings, owner_engine: sa.Engine, services: object, database_url: str
) -> None:
    sql = migrate.offline_sql(MigrationOptions())
    assert "ON CONFLICT DO NOTHING" in sql  # the data migration renders offline too
    migrate.upgrade(settings)
    online = _snapshot(owner_engine)
    with owner_engine.begin() as connection:
        connection.exec_driver_sql("DROP SCHEMA dripiq_app CASCADE")
    run_psql(database_url, sql)
    assert _snapshot(owner_engine) == online


def test_every_function_tenantvault_makes_fixes_its_search_path(
    settings: Settings, owner_engine: sa.Engine
) -> None:
    """No tenantvault function resolves a name through its caller's search_path, where
    a role that may create objects in an earlier schema could shadow a built-in (issue
    22, item 16): every function in the schema, whichever revision made it."""
    migrate.upgrade(settings)
    with owner_engine.connect() as connection:
        functions = connection.exec_driver_sql(
            "SELECT p.proname, p.prosecdef, p.proconfig "
            "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'dripiq_app' ORDER BY 1"
        ).all()
    assert len(functions) >= 15  # 0002 to 0016 make them all in the schema
    unfixed = [
        name for name, _, config in functions if "search_path=pg_catalog" not in (config or [])
    ]
    assert unfixed == []
    # The three 0016 fixes are SECURITY INVOKER: they run with the caller's rights.
    invokers = {name for name, definer, _ in functions if not definer}
    assert {
        "tenantvault_new_id",
        "tenantvault_touch_updated_at",
        "tenantvault_audit_append_only",
    } <= invokers


def test_schema_md_documents_every_table_and_function_tenantvault_makes(
    settings: Settings, owner_engine: sa.Engine
) -> None:
    """docs/schema.md names, in its own section's text, every table tenantvault makes
    (the record of older values, the switch, the replay marks, the claims, the grants
    record, Alembic's bookkeeping) and every function (issue 22, item 17)."""
    from pathlib import Path

    schema_md = (Path(__file__).parents[2] / "docs" / "schema.md").read_text()
    tables_section = schema_md.split("\n## Tables\n", 1)[1].split("\n## Tenant isolation", 1)[0]
    migrate.upgrade(settings, REVISIONS[0])
    with owner_engine.connect() as connection:
        applications = set(
            connection.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'dripiq_app'"
            ).scalars()
        ) - {"alembic_version"}
    migrate.upgrade(settings)
    with owner_engine.connect() as connection:
        tables = set(
            connection.exec_driver_sql(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'dripiq_app' AND c.relkind IN ('r', 'p') "
                "AND NOT c.relispartition"
            ).scalars()
        )
        functions = set(
            connection.exec_driver_sql(
                "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = 'dripiq_app'"
            ).scalars()
        )
    ours = tables - applications
    assert {"tenantvault_grants", "tenantvault_operator_claims", "alembic_version"} <= ours
    assert [t for t in sorted(ours) if f"`{t}`" not in tables_section] == []
    assert [f for f in sorted(functions) if f"`{f}" not in schema_md] == []
