"""An existing database adopts tenantvault: stamp the baseline, upgrade, roll back.
Also: the migrations run as a non-superuser owner bound by FORCE ROW LEVEL SECURITY."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from tenantvault.errors import MigrationError
from tenantvault.ops import migrate
from tenantvault.settings import Settings, load_settings
from tests.support import (
    REVISIONS,
    PsqlError,
    catalog_snapshot,
    legacy_rows,
    run_psql,
    seed_legacy,
    table_rows,
)

DEPLOYED_SCHEMA = (Path(__file__).parent / "fixtures" / "deployed_app_schema.sql").read_text()
APP_TABLES = (
    "organizations",
    "tenants",
    "users",
    "email_sender_identities",
    "contact_campaigns",
    "outbound_messages",
    "send_rate_limits",
)


@pytest.fixture
def deployed(owner_engine: sa.Engine) -> dict[str, list[tuple[object, ...]]]:
    """The application's database before tenantvault, with data; returns every app row."""
    with owner_engine.begin() as connection:
        _deploy(connection)
        return {t: table_rows(connection, t) for t in APP_TABLES}


def _deploy(connection: sa.Connection) -> None:
    connection.exec_driver_sql(DEPLOYED_SCHEMA)
    connection.exec_driver_sql("INSERT INTO dripiq_app.organizations VALUES ('o_1', 'Org');")
    seed_legacy(connection)
    connection.exec_driver_sql(
        "UPDATE dripiq_app.tenants SET organization_id = 'o_1', brand = '{\"color\": \"red\"}', "
        "website = 'https://acme.test' WHERE id = 't_acme';"
        "INSERT INTO dripiq_app.contact_campaigns VALUES ('c_1', 't_acme', 's_acme_1');"
        "INSERT INTO dripiq_app.outbound_messages VALUES ('m_1', 't_acme', 's_acme_2');"
        "INSERT INTO dripiq_app.send_rate_limits VALUES ('r_1', 's_initech_1');"
    )


def _app_rows(engine: sa.Engine) -> dict[str, list[tuple[object, ...]]]:
    with engine.connect() as connection:
        rows = {t: table_rows(connection, t) for t in APP_TABLES}
    # tenantvault's two added columns are the last of email_sender_identities.
    rows["email_sender_identities"] = [r[:14] for r in rows["email_sender_identities"]]
    return rows


def test_adopting_an_existing_database_keeps_every_app_row_and_column(
    settings: Settings, owner_engine: sa.Engine, deployed: dict[str, list[tuple[object, ...]]]
) -> None:
    report = migrate.upgrade(settings, adopt=True)
    assert (report.before, report.after) == (None, REVISIONS[-1])
    assert _app_rows(owner_engine) == deployed
    with owner_engine.connect() as connection:
        linked = connection.execute(
            sa.text(
                "SELECT count(*) FROM dripiq_app.email_sender_identities WHERE provider_config_id IS NOT NULL"
            )
        ).scalar_one()
    assert linked == 3


def test_adoption_is_refused_without_the_flag(settings: Settings, deployed: object) -> None:
    with pytest.raises(MigrationError, match="--adopt"):
        migrate.upgrade(settings)


def test_adopted_database_rolls_back_to_the_deployed_shape(
    settings: Settings, owner_engine: sa.Engine, deployed: dict[str, list[tuple[object, ...]]]
) -> None:
    with owner_engine.connect() as connection:
        before = catalog_snapshot(connection)
    migrate.upgrade(settings, adopt=True)
    migrate.downgrade(settings, REVISIONS[0])
    with owner_engine.connect() as connection:
        after = catalog_snapshot(connection)
    assert _app_rows(owner_engine) == deployed
    # Only Alembic's own bookkeeping table remains.
    for key in after:
        extra = [row for row in after[key] if row not in before[key]]
        assert all("alembic_version" in repr(row) for row in extra), (key, extra)
        assert [row for row in before[key] if row not in after[key]] == [], key


def test_baseline_creates_exactly_the_deployed_shape_of_the_tables_it_knows(
    settings: Settings, owner_engine: sa.Engine, deployed: object, services: object
) -> None:
    with owner_engine.connect() as connection:
        deployed_catalog = catalog_snapshot(connection)
    with owner_engine.begin() as connection:
        connection.exec_driver_sql("DROP SCHEMA dripiq_app CASCADE")
    migrate.upgrade(settings, REVISIONS[0])
    with owner_engine.connect() as connection:
        baseline_catalog = catalog_snapshot(connection)
    known = ("tenants", "users", "email_sender_identities")
    known_columns = {(t, c) for t, c, *_ in baseline_catalog["columns"] if t in known}
    for key in ("columns", "indexes", "constraints"):
        ours = _known_rows(baseline_catalog[key], key, known_columns)
        theirs = _known_rows(deployed_catalog[key], key, known_columns)
        assert ours == theirs, key


def _known_rows(
    rows: list[tuple[object, ...]], key: str, known_columns: set[tuple[object, object]]
) -> list[tuple[object, ...]]:
    """The rows about tenants, users and sender identities, without the app's extras."""
    picked = []
    for row in rows:
        table = str(row[0]).removeprefix("dripiq_app.")
        if table not in ("tenants", "users", "email_sender_identities"):
            continue
        if key == "columns" and (row[0], row[1]) not in known_columns:
            continue  # the application's extra columns
        if key == "constraints" and "organizations" in repr(row):
            continue
        picked.append(row)
    return picked


# --- a non-superuser owner, as in production ---


def _server_version(connection: sa.Connection) -> int:
    return int(connection.exec_driver_sql("SHOW server_version_num").scalar_one())


OWNER_ROLE = "tenantvault_test_owner"


@pytest.fixture
def owner_settings(settings: Settings, owner_engine: sa.Engine, database_url: str) -> Settings:
    """Settings that connect as a plain login role owning the database (no superuser,
    no BYPASSRLS), with the roles made and the membership granted by a DBA beforehand."""
    database = settings.sqlalchemy_url.database
    with owner_engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        for role in (settings.app_role, settings.migrator_role, OWNER_ROLE):
            connection.exec_driver_sql(
                f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
                f"THEN CREATE ROLE {role}; END IF; END $$"
            )
        connection.exec_driver_sql(f"ALTER ROLE {OWNER_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS")
        inherit = " WITH INHERIT FALSE" if _server_version(connection) >= 160000 else ""
        connection.exec_driver_sql(f"GRANT {settings.migrator_role} TO {OWNER_ROLE}{inherit}")
        connection.exec_driver_sql(f'ALTER DATABASE "{database}" OWNER TO {OWNER_ROLE}')
    url = settings.sqlalchemy_url.set(username=OWNER_ROLE, password=None)
    return load_settings(database_url=url.render_as_string(hide_password=False))


def test_migrations_run_as_a_non_superuser_owner_under_forced_rls(owner_settings: Settings) -> None:
    migrate.upgrade(owner_settings, REVISIONS[0])
    engine = migrate.migration_engine(owner_settings)
    with engine.begin() as connection:
        assert (
            connection.execute(
                sa.text(
                    "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"
                )
            ).scalar_one()
            is False
        )
        seed_legacy(connection)
        seeded = legacy_rows(connection)
    migrate.upgrade(owner_settings)
    with engine.begin() as connection:
        assert legacy_rows(connection) == seeded
        # FORCE ROW LEVEL SECURITY binds the owner too: with no tenant set it sees nothing,
        # unless its membership in the migrator role inherits (before PostgreSQL 16).
        visible = connection.execute(
            sa.text("SELECT count(*) FROM dripiq_app.email_provider_configs")
        ).scalar_one()
        assert visible == (0 if _server_version(connection) >= 160000 else 2)
        # The data migration, run as the migrator role, made both default configs.
        connection.exec_driver_sql(f"SET LOCAL ROLE {owner_settings.migrator_role}")
        assert (
            connection.execute(
                sa.text("SELECT count(*) FROM dripiq_app.email_provider_configs")
            ).scalar_one()
            == 2
        )
        connection.execute(
            sa.text(
                "INSERT INTO dripiq_app.email_provider_configs (tenant_id, type, name, config) "
                "VALUES ('t_globex', 'smtp', 'Relay', '{}')"
            )
        )
    # The downgrade guard must see rows that RLS hides from the owner.
    with pytest.raises(MigrationError, match="email provider configs"):
        migrate.downgrade(owner_settings, REVISIONS[0], allow_data_loss=False)
    engine.dispose()


# --- the plan a DBA reviews: migrate --sql --adopt / --sql --downgrade ---


def _deploy_again(owner_engine: sa.Engine) -> None:
    """The same deployed database as the ``deployed`` fixture makes, made afresh."""
    with owner_engine.begin() as connection:
        connection.exec_driver_sql("DROP SCHEMA dripiq_app CASCADE")
        _deploy(connection)


def _state(engine: sa.Engine) -> tuple[object, ...]:
    """The catalog, the revision, the app's rows and what adoption made of them."""
    with engine.connect() as connection:
        made = connection.exec_driver_sql(
            "SELECT c.tenant_id, c.name, c.is_default, array_agg(s.id ORDER BY s.id) "
            "FROM dripiq_app.email_provider_configs c "
            "LEFT JOIN dripiq_app.email_sender_identities s ON s.provider_config_id = c.id "
            "GROUP BY 1, 2, 3 ORDER BY 1"
        ).all()
        revision = migrate.current_revision(connection, "dripiq_app")
        return catalog_snapshot(connection), revision, made


def _apply(database_url: str, sql: str) -> None:
    run_psql(database_url, sql)


def test_the_rendered_adoption_builds_what_the_online_adoption_builds(
    settings: Settings,
    owner_engine: sa.Engine,
    deployed: dict[str, list[tuple[object, ...]]],
    database_url: str,
) -> None:
    from tenantvault.db.migration_support import MigrationOptions

    sql = migrate.offline_sql(MigrationOptions(), adopt=True)
    assert "CREATE TABLE dripiq_app.tenants" not in sql  # the baseline is stamped, not run
    migrate.upgrade(settings, adopt=True)
    online = _state(owner_engine)
    _deploy_again(owner_engine)
    _apply(database_url, sql)
    assert _state(owner_engine) == online
    # The app's rows as deployed (users' created_at defaults to the time of seeding).
    rows = _app_rows(owner_engine)
    assert {t: r for t, r in rows.items() if t != "users"} == {
        t: r for t, r in deployed.items() if t != "users"
    }
    # Run twice, the script stops at its guard and changes nothing.
    with pytest.raises(PsqlError, match="already has tenantvault history"):
        _apply(database_url, sql)
    assert _state(owner_engine) == online


def test_the_rendered_downgrade_refuses_where_data_would_be_lost_and_else_restores(
    settings: Settings,
    owner_engine: sa.Engine,
    deployed: dict[str, list[tuple[object, ...]]],
    database_url: str,
) -> None:
    from tenantvault.db.migration_support import MigrationOptions

    with owner_engine.connect() as connection:
        at_deploy = catalog_snapshot(connection)
    migrate.upgrade(settings, adopt=True)
    sql = migrate.offline_sql(MigrationOptions(), REVISIONS[0], downgrade_from="head")
    with owner_engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO dripiq_app.email_provider_configs (tenant_id, type, name, config) "
            "VALUES ('t_globex', 'smtp', 'Relay', '{}')"
        )
    with pytest.raises(PsqlError, match="email provider configs"):
        _apply(database_url, sql)
    with owner_engine.begin() as connection:
        assert migrate.current_revision(connection, "dripiq_app") != REVISIONS[-1]  # steps ran
        connection.exec_driver_sql(
            "DELETE FROM dripiq_app.email_provider_configs WHERE name = 'Relay'"
        )
        at = migrate.current_revision(connection, "dripiq_app")
    _apply(database_url, migrate.offline_sql(MigrationOptions(), REVISIONS[0], downgrade_from=at))
    with owner_engine.connect() as connection:
        after = catalog_snapshot(connection)
        assert migrate.current_revision(connection, "dripiq_app") == REVISIONS[0]
    assert _app_rows(owner_engine) == deployed
    for key in after:
        kept = [row for row in after[key] if "alembic_version" not in repr(row)]
        assert kept == at_deploy[key], key
