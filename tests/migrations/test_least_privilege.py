"""A DBA adopts tenantvault on the application's live database as the migration guide
says: the login that owns the schema and its tables, with no privilege on the database
itself and no superuser, the roles made beforehand by a DBA. Nothing the application
had is taken away, not even by a downgrade."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tenantvault import cli
from tenantvault.ops import migrate
from tenantvault.settings import Settings, load_settings
from tests.conftest import APP_LOGIN_ROLE, Services
from tests.support import REVISIONS, catalog_snapshot, run_psql, seed_legacy

DEPLOYED_SCHEMA = (Path(__file__).parent / "fixtures" / "deployed_app_schema.sql").read_text()
OWNER = "tenantvault_test_schema_owner"


def server_version(connection: sa.Connection) -> int:
    return int(connection.exec_driver_sql("SHOW server_version_num").scalar_one())


GUIDE = (Path(__file__).parents[2] / "docs" / "migration-guide.md").read_text()


def guide_sql(step: str) -> list[str]:
    """The ```sql blocks of the migration guide's section that starts with ``step``."""
    section = GUIDE.split(f"\n## {step}", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```sql\n")[1:]]


def dba_role_setup(connection: sa.Connection, owner: str, app_login: str) -> None:
    """The migration guide's step 2, run by a DBA, word for word."""
    create_roles, on_16, on_15 = guide_sql("2. Roles")
    memberships = on_16 if server_version(connection) >= 160000 else on_15
    for block in (create_roles, memberships):
        connection.exec_driver_sql(block.replace("<owner>", owner))
    connection.exec_driver_sql(f"GRANT tenantvault_app TO {app_login}")


@pytest.fixture
def live_database(settings: Settings, owner_engine: sa.Engine) -> Iterator[Settings]:
    """The application's database as deployed: its schema and tables owned by the
    application's ORM login, which has no privilege on the database itself. The app
    login's schema USAGE comes through tenantvault_app, as the guide arranges, and
    the application's own grants exist before tenantvault arrives."""
    database = settings.sqlalchemy_url.database
    with owner_engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{OWNER}') "
            f"THEN CREATE ROLE {OWNER}; END IF; END $$"
        )
        connection.exec_driver_sql(
            f"ALTER ROLE {OWNER} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS INHERIT"
        )
        connection.exec_driver_sql(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_LOGIN_ROLE}')"
            f" THEN CREATE ROLE {APP_LOGIN_ROLE} LOGIN; END IF; END $$"
        )
        connection.exec_driver_sql(f'REVOKE CREATE ON DATABASE "{database}" FROM PUBLIC')
        connection.exec_driver_sql(DEPLOYED_SCHEMA)
        connection.exec_driver_sql("INSERT INTO dripiq_app.organizations VALUES ('o_1', 'Org')")
        seed_legacy(connection)
        connection.exec_driver_sql(f"ALTER SCHEMA dripiq_app OWNER TO {OWNER}")
        for (table,) in connection.exec_driver_sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'dripiq_app'"
        ).all():
            connection.exec_driver_sql(f"ALTER TABLE dripiq_app.{table} OWNER TO {OWNER}")
        dba_role_setup(connection, OWNER, APP_LOGIN_ROLE)
        # What the application had: its login reaches the schema through the app role,
        # and reads its own tables; a DBA also let the migrator read the tenants.
        connection.exec_driver_sql("GRANT USAGE ON SCHEMA dripiq_app TO tenantvault_app")
        connection.exec_driver_sql(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON dripiq_app.tenants, dripiq_app.users, "
            f"dripiq_app.email_sender_identities TO {APP_LOGIN_ROLE}"
        )
        connection.exec_driver_sql("GRANT SELECT ON dripiq_app.tenants TO tenantvault_migrator")
        connection.exec_driver_sql(
            "GRANT SELECT (id, tenant_id) ON dripiq_app.email_sender_identities TO tenantvault_app"
        )
        # The guide's step 1 check: the owner owns the schema and tables, may connect,
        # and has nothing else on the database, no superuser, CREATEROLE or BYPASSRLS.
        (check,) = guide_sql("1. Check the owner")
        row = connection.exec_driver_sql(check.replace("<owner>", OWNER)).one()
        assert tuple(row) == (OWNER, None, False, False, False, True, False)
    url = settings.sqlalchemy_url.set(username=OWNER, password=None)
    owner_settings = load_settings(
        database_url=url.render_as_string(hide_password=False),
        VAULT_ADDR=str(settings.vault_addr),
        VAULT_TOKEN=settings.vault_token.get_secret_value() if settings.vault_token else "",
    )
    yield owner_settings
    with owner_engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql(f"ALTER ROLE {OWNER} INHERIT")


def test_the_schema_owner_adopts_without_any_privilege_on_the_database(
    live_database: Settings, owner_engine: sa.Engine
) -> None:
    with owner_engine.connect() as connection:
        before = {
            t: connection.exec_driver_sql(f"SELECT * FROM dripiq_app.{t} ORDER BY 1").all()
            for t in ("tenants", "users", "organizations")
        }
    report = migrate.upgrade(live_database, adopt=True)
    assert (report.before, report.after) == (None, REVISIONS[-1])
    with owner_engine.connect() as connection:
        after = {
            t: connection.exec_driver_sql(f"SELECT * FROM dripiq_app.{t} ORDER BY 1").all()
            for t in before
        }
        defaults = connection.exec_driver_sql(
            "SELECT tenant_id FROM dripiq_app.email_provider_configs ORDER BY 1"
        ).all()
    assert after == before
    assert [d for (d,) in defaults] == ["t_acme", "t_initech"]
    # A rerun changes nothing.
    assert migrate.upgrade(live_database, adopt=True).before == REVISIONS[-1]


def test_an_upgrade_and_downgrade_leave_every_prior_grant_exactly_as_it_was(
    live_database: Settings, owner_engine: sa.Engine
) -> None:
    with owner_engine.connect() as connection:
        before = catalog_snapshot(connection)
    migrate.upgrade(live_database, adopt=True)
    with owner_engine.connect() as connection:
        assert catalog_snapshot(connection)["schema_acl"] != []
    migrate.downgrade(live_database, REVISIONS[0])
    with owner_engine.connect() as connection:
        after = catalog_snapshot(connection)
    for key in ("schema_acl", "table_grants", "column_grants"):
        # Alembic's bookkeeping table stays (the guide says so); everything else is as it was.
        kept = [row for row in after[key] if "alembic_version" not in repr(row)]
        assert kept == before[key], key
    # The application still works through its login: the schema and its tables.
    app = sa.create_engine(
        live_database.sqlalchemy_url.set(username=APP_LOGIN_ROLE, drivername="postgresql+psycopg")
    )
    with app.connect() as connection:
        assert (
            connection.exec_driver_sql("SELECT count(*) FROM dripiq_app.tenants").scalar_one() == 3
        )
    app.dispose()


def _run_cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    url: str,
    services: Services,
    *command: str,
) -> tuple[int, str, str]:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", url)
    monkeypatch.setenv("VAULT_ADDR", services.vault_addr)
    monkeypatch.setenv("VAULT_TOKEN", services.vault_token)
    monkeypatch.setenv("TENANTVAULT_TRANSIT_KEY", "tenantvault-tests")
    code = cli.main(list(command))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_status_works_as_the_owner_and_names_what_the_app_login_cannot_check(
    live_database: Settings,
    services: Services,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    migrate.upgrade(live_database, adopt=True)
    owner_url = live_database.database_url.get_secret_value()
    code, out, err = _run_cli(monkeypatch, capsys, owner_url, services, "status")
    assert (code, err) == (cli.EXIT_OK, ""), out
    assert "up to date" in out
    assert "0 rows visible to the app role without a tenant" in out
    assert "not checked" not in out

    app_url = live_database.sqlalchemy_url.set(username=APP_LOGIN_ROLE).render_as_string(
        hide_password=False
    )
    code, out, err = _run_cli(monkeypatch, capsys, app_url, services, "status")
    assert err == ""
    assert code == cli.EXIT_UNHEALTHY  # what it could not check is not called healthy
    assert "Traceback" not in out
    not_checked = [line for line in out.splitlines() if "not checked" in line]
    assert any(line.startswith("schema ") for line in not_checked), out
    assert any(line.startswith("data keys ") for line in not_checked), out
    # What the app login can check, it does: it sees nothing without a tenant, and the
    # audit log's partitions are ahead.
    assert "0 rows visible to the app role without a tenant" in out
    assert "audit log     partitions until 20" in out


def test_the_grants_command_sets_up_an_app_login_that_keeps_tenants_apart(
    live_database: Settings,
    owner_engine: sa.Engine,
    services: Services,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import uuid

    from tenantvault import Vault

    migrate.upgrade(live_database, adopt=True)
    login = f"tv_new_app_{uuid.uuid4().hex[:8]}"
    with owner_engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql(f"CREATE ROLE {login} LOGIN")
    owner_url = live_database.database_url.get_secret_value()
    code, both, err = _run_cli(
        monkeypatch, capsys, owner_url, services, "grants", "--app-login", login
    )
    assert (code, err) == (cli.EXIT_OK, "")
    # As the guide runs it: each part on its own, by the login it is for.
    _, dba_part, _ = _run_cli(
        monkeypatch, capsys, owner_url, services, "grants", "--app-login", login, "--part", "dba"
    )
    _, owner_part, _ = _run_cli(
        monkeypatch, capsys, owner_url, services, "grants", "--app-login", login, "--part", "owner"
    )
    assert dba_part + owner_part == both
    assert f'GRANT "tenantvault_app" TO "{login}";' in dba_part
    assert "email_provider_configs" not in owner_part  # tenantvault's tables: the app role only
    assert '"dripiq_app"."contact_campaigns"' in owner_part  # every table of the application
    with owner_engine.connect() as connection:  # the DBA
        connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql(dba_part)
    owner = migrate.migration_engine(live_database)
    with owner.begin() as connection:  # the schema's owner, no superuser
        connection.exec_driver_sql(owner_part)
        # The owner itself is bound too: no tenant, no rows (PG 15 as well, NOINHERIT).
        assert (
            connection.exec_driver_sql(
                "SELECT count(*) FROM dripiq_app.email_provider_configs"
            ).scalar_one()
            == 0
        )
    owner.dispose()

    url = live_database.sqlalchemy_url.set(username=login).render_as_string(hide_password=False)
    app = sa.create_engine(url)
    with app.begin() as connection:  # the application's own tables, as its ORM uses them
        assert (
            connection.exec_driver_sql("SELECT count(*) FROM dripiq_app.tenants").scalar_one() == 3
        )
        connection.exec_driver_sql(
            "INSERT INTO dripiq_app.organizations VALUES ('o_2', 'Org 2');"
            "UPDATE dripiq_app.organizations SET name = 'Org two' WHERE id = 'o_2';"
            "DELETE FROM dripiq_app.organizations WHERE id = 'o_2'"
        )
    vault = Vault.from_settings(
        load_settings(
            database_url=url,
            VAULT_ADDR=services.vault_addr,
            VAULT_TOKEN=services.vault_token,
            transit_key="tenantvault-tests",
        )
    )
    smtp = {
        "host": "smtp.example.com",
        "port": 587,
        "secure": False,
        "auth_type": "login",
        "user": "u",
    }
    cfg = vault.create_config(
        "t_globex", type="smtp", name="Relay", config=smtp, credentials={"password": "pw-1"}
    )
    assert vault.load_credentials("t_globex", cfg.id).password.get_secret_value() == "pw-1"  # type: ignore[union-attr]
    vault.dispose()
    with app.begin() as connection:
        # Another tenant's transaction sees none of it; no tenant sees nothing at all.
        connection.exec_driver_sql("SELECT set_config('tenantvault.tenant_id', 't_acme', true)")
        names = (
            connection.exec_driver_sql("SELECT name FROM dripiq_app.email_provider_configs")
            .scalars()
            .all()
        )
        assert names == ["SendGrid (Default)"]
    with app.connect() as connection:
        assert (
            connection.exec_driver_sql(
                "SELECT count(*) FROM dripiq_app.email_provider_configs"
            ).scalar_one()
            == 0
        )
    with (
        app.begin() as connection,
        pytest.raises(sa.exc.ProgrammingError, match="permission denied"),
    ):
        connection.exec_driver_sql("DELETE FROM dripiq_app.email_provider_configs")
    app.dispose()

    # A login that could cross tenants is refused, with the reason.
    for unsafe, reason in ((OWNER, "owns the schema"), ("postgres", "superuser")):
        code, out, err = _run_cli(
            monkeypatch, capsys, owner_url, services, "grants", "--app-login", unsafe
        )
        assert code == cli.EXIT_USAGE
        assert reason in err
        assert out == ""


def test_default_privileges_of_the_schema_reach_none_of_tenantvaults_objects(
    live_database: Settings, owner_engine: sa.Engine
) -> None:
    """A platform's ALTER DEFAULT PRIVILEGES would hand every new table to the app login
    and PUBLIC: DELETE on configs, and the audit partitions, which have no RLS."""
    from tenantvault.ops import jobs

    with owner_engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        for grant in (
            f"GRANT ALL ON TABLES TO {APP_LOGIN_ROLE}, PUBLIC",
            f"GRANT EXECUTE ON FUNCTIONS TO {APP_LOGIN_ROLE}",
        ):
            connection.exec_driver_sql(
                f"ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER} IN SCHEMA dripiq_app {grant}"
            )
    migrate.upgrade(live_database, adopt=True)
    assert jobs.audit_partitions_job(live_database, months_ahead=30) > 0  # made after 0010
    with owner_engine.connect() as connection:
        holders = connection.exec_driver_sql(
            "SELECT DISTINCT c.relname, "
            "CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, "
            "aclexplode(c.relacl) a WHERE n.nspname = 'dripiq_app' AND a.grantee <> c.relowner "
            "AND (c.relname LIKE 'audit%%' OR c.relname LIKE 'email_provider%%' "
            "OR c.relname IN ('tenant_data_keys', 'tenantvault_grants')) ORDER BY 1, 2"
        ).all()
        functions = (
            connection.exec_driver_sql(
                "SELECT DISTINCT a.grantee::regrole::text FROM pg_proc p "
                "JOIN pg_namespace n ON n.oid = p.pronamespace, aclexplode(p.proacl) a "
                "WHERE n.nspname = 'dripiq_app' AND a.grantee NOT IN (0, p.proowner)"
            )
            .scalars()
            .all()
        )
    assert {grantee for _, grantee in holders} <= {"tenantvault_app", "tenantvault_migrator"}
    # The grants record, which a downgrade executes as the owner: the owner's alone, and
    # it holds plain REVOKEs only.
    assert [name for name, _ in holders if name == "tenantvault_grants"] == []
    with owner_engine.connect() as connection, pytest.raises(sa.exc.IntegrityError):
        connection.exec_driver_sql(
            "INSERT INTO dripiq_app.tenantvault_grants VALUES ('0002_provider_tables', "
            '\'REVOKE SELECT ON "dripiq_app"."tenants" FROM "x"; DROP TABLE dripiq_app.users\')'
        )
    assert not [name for name, _ in holders if name.startswith("audit_events_")]
    assert set(functions) <= {"tenantvault_app", "tenantvault_migrator"}
    app = sa.create_engine(
        live_database.sqlalchemy_url.set(username=APP_LOGIN_ROLE, drivername="postgresql+psycopg")
    )
    with app.connect() as connection:
        partition = connection.exec_driver_sql(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'dripiq_app.audit_events'::regclass ORDER BY 1 DESC LIMIT 1"
        ).scalar_one()
        for statement in (
            f"SELECT count(*) FROM dripiq_app.{partition}",
            "DELETE FROM dripiq_app.email_provider_configs",
        ):
            with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                connection.exec_driver_sql(statement)
            connection.rollback()
    app.dispose()


# --- grants --app-login refuses every login that could cross tenants (issue 21, item 8) ---


def _grants_cli(settings: Settings, services: Services, login: str) -> tuple[int, str, str]:
    """``tenantvault grants --app-login LOGIN`` as a real process, as the schema's owner."""
    import subprocess
    import sys

    from tests.conftest import child_environment

    result = subprocess.run(
        [sys.executable, "-m", "tenantvault.cli", "grants", "--app-login", login],
        env=child_environment(settings, services),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr


# Each case: the roles to make (name suffix -> attributes), the memberships (member ->
# role, by suffix; "owner" and "migrator" name the schema's owner and the migrator
# role), and what the refusal must say.
UNSAFE_LOGINS = {
    "superuser": ({"login": "LOGIN SUPERUSER"}, [], "is a superuser"),
    "bypassrls": ({"login": "LOGIN BYPASSRLS"}, [], "has BYPASSRLS"),
    "createrole": ({"login": "LOGIN CREATEROLE"}, [], "has CREATEROLE"),
    "member of a superuser, through a group": (
        {"login": "LOGIN", "group": "NOLOGIN", "admin": "NOLOGIN SUPERUSER"},
        [("login", "group"), ("group", "admin")],
        "is a member of {admin} ({login} > {group} > {admin}), which is a superuser",
    ),
    "member of a BYPASSRLS role": (
        {"login": "LOGIN", "reader": "NOLOGIN BYPASSRLS"},
        [("login", "reader")],
        "is a member of {reader} ({login} > {reader}), which has BYPASSRLS",
    ),
    "member of a CREATEROLE role, through two groups": (
        {"login": "LOGIN", "a": "NOLOGIN", "b": "NOLOGIN", "maker": "NOLOGIN CREATEROLE"},
        [("login", "a"), ("a", "b"), ("b", "maker")],
        "is a member of {maker} ({login} > {a} > {b} > {maker}), which has CREATEROLE",
    ),
    "member of the owner, through a group": (
        {"login": "LOGIN", "group": "NOLOGIN"},
        [("login", "group"), ("group", "owner")],
        f"is a member of {OWNER} ({{login}} > {{group}} > {OWNER}), which owns the schema",
    ),
    "member of the migrator role, through a group": (
        {"login": "LOGIN", "group": "NOLOGIN"},
        [("login", "group"), ("group", "migrator")],
        "is a member of tenantvault_migrator ({login} > {group} > tenantvault_migrator), "
        "which is the migrator role",
    ),
}


@pytest.mark.parametrize("case", list(UNSAFE_LOGINS))
def test_grants_refuses_a_login_that_could_cross_tenants_with_its_reason(
    case: str, live_database: Settings, owner_engine: sa.Engine, services: Services
) -> None:
    import uuid

    migrate.upgrade(live_database, adopt=True)
    attributes, memberships, expected = UNSAFE_LOGINS[case]
    suffix = uuid.uuid4().hex[:8]
    names = {key: f"tv_{key}_{suffix}" for key in attributes}
    names.update(owner=OWNER, migrator="tenantvault_migrator")
    with owner_engine.connect() as connection:  # a DBA (the tests' superuser) makes them
        connection.execution_options(isolation_level="AUTOCOMMIT")
        for key, attribute in attributes.items():
            connection.exec_driver_sql(f"CREATE ROLE {names[key]} {attribute}")
        for member, role in memberships:
            connection.exec_driver_sql(f"GRANT {names[role]} TO {names[member]}")
        # Also a member of the app role, as a real app login would be: no excuse.
        connection.exec_driver_sql(f"GRANT tenantvault_app TO {names['login']}")
    try:
        code, out, err = _grants_cli(live_database, services, names["login"])
    finally:
        with owner_engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            for key in attributes:
                connection.exec_driver_sql(f"DROP ROLE {names[key]}")
    assert code == cli.EXIT_USAGE, (out, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"FAILED: --app-login: {names['login']} "), err
    assert expected.format(**names) in lines[0], err


def test_grants_accepts_a_login_that_is_a_member_of_the_app_role_only(
    live_database: Settings, owner_engine: sa.Engine, services: Services
) -> None:
    """The refusals are not blanket: a login in the app role, through a group too."""
    import uuid

    migrate.upgrade(live_database, adopt=True)
    login, group = (f"tv_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("login", "group"))
    with owner_engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql(f"CREATE ROLE {login} LOGIN; CREATE ROLE {group} NOLOGIN")
        connection.exec_driver_sql(f"GRANT {group} TO {login}; GRANT tenantvault_app TO {group}")
    try:
        code, out, err = _grants_cli(live_database, services, login)
    finally:
        with owner_engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            connection.exec_driver_sql(f"DROP ROLE {login}; DROP ROLE {group}")
    assert (code, err) == (cli.EXIT_OK, "")
    assert f'GRANT "tenantvault_app" TO "{login}";' in out


# --- the grants record names only the schema's objects and tenantvault's roles (item 13) ---

HOSTILE_REVOKES = [
    'REVOKE SELECT ON "pg_catalog"."pg_authid" FROM "postgres"',
    f'REVOKE SELECT ON "dripiq_app"."tenants" FROM "{APP_LOGIN_ROLE}"',
    'REVOKE USAGE ON SCHEMA "public" FROM "tenantvault_app"',
    'REVOKE SELECT ON "public"."tenants" FROM "tenantvault_migrator"',
    'REVOKE SELECT ON "dripiq_app"."tenants" FROM "postgres"',
]


def test_the_owner_cannot_record_a_revoke_of_anything_but_the_schemas_objects_from_our_roles(
    live_database: Settings,
) -> None:
    migrate.upgrade(live_database, adopt=True)
    owner = migrate.migration_engine(live_database)
    try:
        for hostile in HOSTILE_REVOKES:
            with owner.connect() as connection, pytest.raises(sa.exc.IntegrityError):
                connection.execute(
                    sa.text("INSERT INTO dripiq_app.tenantvault_grants VALUES ('x', :r)"),
                    {"r": hostile},
                )
        with owner.connect() as connection:  # what tenantvault records still goes in
            for fine in (
                'REVOKE SELECT ON "dripiq_app"."users" FROM "tenantvault_migrator"',
                'REVOKE SELECT ("email") ON "dripiq_app"."users" FROM "tenantvault_app"',
                'REVOKE USAGE ON SCHEMA "dripiq_app" FROM "tenantvault_app"',
            ):
                connection.execute(
                    sa.text("INSERT INTO dripiq_app.tenantvault_grants VALUES ('x', :r)"),
                    {"r": fine},
                )
            connection.rollback()
    finally:
        owner.dispose()


def _plant_past_the_check(owner_engine: sa.Engine, revision: str, statement: str) -> None:
    """A row the record's CHECK would refuse, as one that got in before 0014 or with the
    CHECK dropped: a superuser drops the CHECK, inserts, and puts the CHECK back for the
    rows to come (NOT VALID)."""
    with owner_engine.begin() as connection:
        definition = connection.exec_driver_sql(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conname = 'tenantvault_grants_revoke_check'"
        ).scalar_one()
        assert "dripiq_app" in definition  # 0014's
        connection.exec_driver_sql(
            "ALTER TABLE dripiq_app.tenantvault_grants "
            "DROP CONSTRAINT tenantvault_grants_revoke_check"
        )
        connection.execute(
            sa.text("INSERT INTO dripiq_app.tenantvault_grants VALUES (:v, :r)"),
            {"v": revision, "r": statement},
        )
        connection.exec_driver_sql(
            "ALTER TABLE dripiq_app.tenantvault_grants "
            f"ADD CONSTRAINT tenantvault_grants_revoke_check {definition} NOT VALID"
        )


def _app_login_reads_tenants(owner_engine: sa.Engine) -> bool:
    with owner_engine.connect() as connection:
        return bool(
            connection.exec_driver_sql(
                f"SELECT has_table_privilege('{APP_LOGIN_ROLE}', 'dripiq_app.tenants', 'SELECT')"
            ).scalar_one()
        )


def test_a_recorded_revoke_of_anything_else_makes_the_downgrade_refuse_changing_nothing(
    live_database: Settings,
    owner_engine: sa.Engine,
    services: Services,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The owner (or a row from before 0014) records a REVOKE of the application login's
    own privilege: a downgrade run by anyone would take it away. It refuses first."""
    migrate.upgrade(live_database, adopt=True)
    hostile = f'REVOKE SELECT ON "dripiq_app"."tenants" FROM "{APP_LOGIN_ROLE}"'
    _plant_past_the_check(owner_engine, "0003_sender_identity_links", hostile)
    assert _app_login_reads_tenants(owner_engine)
    with owner_engine.connect() as connection:
        before = catalog_snapshot(connection)
    owner_url = live_database.database_url.get_secret_value()
    code, out, err = _run_cli(
        monkeypatch,
        capsys,
        owner_url,
        services,
        "migrate",
        "--downgrade",
        "--revision",
        REVISIONS[1],
        "--allow-data-loss",
    )
    assert code == cli.EXIT_FAILED, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(
        f"FAILED: downgrade to {REVISIONS[1]} refused, nothing was changed: "
        "dripiq_app.tenantvault_grants holds, for 0003_sender_identity_links, a statement "
        "tenantvault does not write"
    ), err
    assert APP_LOGIN_ROLE in lines[0]
    with owner_engine.connect() as connection:
        assert catalog_snapshot(connection) == before
        assert migrate.current_revision(connection, "dripiq_app") == REVISIONS[-1]
    assert _app_login_reads_tenants(owner_engine)


def test_each_downgrade_step_checks_the_recorded_revokes_before_it_runs_one(
    live_database: Settings, owner_engine: sa.Engine
) -> None:
    """Plain Alembic, or a row written while a downgrade runs: the step that would run
    it refuses, and that step changes nothing."""
    from alembic import command

    from tenantvault.db.migration_support import MigrationOptions
    from tenantvault.errors import MigrationError

    migrate.upgrade(live_database, adopt=True)
    hostile = f'REVOKE SELECT ON "dripiq_app"."tenants" FROM "{APP_LOGIN_ROLE}"'
    _plant_past_the_check(owner_engine, "0003_sender_identity_links", hostile)
    owner = migrate.migration_engine(live_database)
    options = MigrationOptions.from_settings(live_database, allow_data_loss=True)
    try:
        with pytest.raises(MigrationError, match="downgrade of 0003_sender_identity_links refused"):
            command.downgrade(migrate.alembic_config(options, connection=owner), REVISIONS[1])
    finally:
        owner.dispose()
    with owner_engine.connect() as connection:
        # The steps above it ran; 0003 did not: its record is all there, the row too.
        assert migrate.current_revision(connection, "dripiq_app") == REVISIONS[2]
        recorded = (
            connection.exec_driver_sql(
                "SELECT revoke FROM dripiq_app.tenantvault_grants "
                "WHERE revision = '0003_sender_identity_links'"
            )
            .scalars()
            .all()
        )
        assert hostile in recorded
        assert len(recorded) >= 2  # the migrator's SELECT on sender identities too
    assert _app_login_reads_tenants(owner_engine)


def test_the_upgrade_to_the_strict_record_refuses_a_row_the_old_check_let_in(
    live_database: Settings, owner_engine: sa.Engine
) -> None:
    """Before 0014 the owner could record a REVOKE on pg_catalog from postgres; the
    upgrade to 0014 names it and changes nothing until it is deleted."""
    from tenantvault.errors import MigrationError

    strict = "0014_grants_record_targets"
    before_it = REVISIONS[REVISIONS.index(strict) - 1]
    migrate.upgrade(live_database, before_it, adopt=True)
    hostile = 'REVOKE SELECT ON "pg_catalog"."pg_authid" FROM "postgres"'
    owner = migrate.migration_engine(live_database)
    try:
        with owner.begin() as connection:  # the old CHECK admits it
            connection.execute(
                sa.text("INSERT INTO dripiq_app.tenantvault_grants VALUES ('x', :r)"),
                {"r": hostile},
            )
        with pytest.raises(MigrationError) as refused:
            migrate.upgrade(live_database)
        assert "tenantvault does not write: " + hostile in str(refused.value)
        assert "Nothing was changed by this step" in str(refused.value)
        with owner.connect() as connection:
            assert migrate.current_revision(connection, "dripiq_app") == before_it
        with owner.begin() as connection:
            connection.exec_driver_sql(
                "DELETE FROM dripiq_app.tenantvault_grants WHERE revision = 'x'"
            )
        assert migrate.upgrade(live_database).after == REVISIONS[-1]
    finally:
        owner.dispose()


# --- the adopting DBA's items (issue 22, items 11, 12, 13, 15, 16, 17) ---

OTHER_OWNER = "tenantvault_test_other_owner"


def _psql_url(settings: Settings) -> str:
    """The URL of ``settings``' login as psql takes it."""
    return settings.sqlalchemy_url.set(drivername="postgresql").render_as_string(
        hide_password=False
    )


def _cli(settings: Settings, services: Services, *args: str, **env: str) -> tuple[int, str, str]:
    """``tenantvault ARGS`` as a real process, as the login of ``settings``."""
    import subprocess
    import sys

    from tests.conftest import child_environment

    result = subprocess.run(
        [sys.executable, "-m", "tenantvault.cli", *args],
        env={**child_environment(settings, services), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr


@pytest.fixture
def foreign_table(live_database: Settings, owner_engine: sa.Engine) -> Settings:
    """The live database where one application table has another owner: a service of
    the application's made it, as the DBA adopting tenantvault found."""
    with owner_engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
            f"'{OTHER_OWNER}') THEN CREATE ROLE {OTHER_OWNER}; END IF; END $$"
        )
        connection.exec_driver_sql(
            f"ALTER TABLE dripiq_app.contact_campaigns OWNER TO {OTHER_OWNER}"
        )
    return live_database


def _step_1(owner_engine: sa.Engine) -> tuple[object, ...]:
    (check,) = guide_sql("1. Check the owner")
    with owner_engine.connect() as connection:
        return tuple(connection.exec_driver_sql(check.replace("<owner>", OWNER)).one())


def test_step_1_lists_every_table_the_owner_does_not_own(
    foreign_table: Settings, owner_engine: sa.Engine
) -> None:
    """Item 11: the check covers every table of the schema, not the three the
    migrations alter: the owner's grants of step 5 need them all."""
    assert _step_1(owner_engine) == (OWNER, ["contact_campaigns"], False, False, False, True, False)
    with owner_engine.connect() as connection:  # the fix the guide gives, by a DBA
        connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql(f"ALTER TABLE dripiq_app.contact_campaigns OWNER TO {OWNER}")
    assert _step_1(owner_engine)[1] is None


def test_grants_names_the_tables_the_owner_must_be_given(
    foreign_table: Settings, owner_engine: sa.Engine, services: Services
) -> None:
    """Item 11: the owner's part would fail in psql (permission denied for table
    contact_campaigns); grants refuses it instead, naming the table and its owner."""
    code, out, err = _cli(foreign_table, services, "grants", "--app-login", APP_LOGIN_ROLE)
    assert (code, out) == (cli.EXIT_FAILED, ""), err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("FAILED: "), err
    assert f"dripiq_app.contact_campaigns (owned by {OTHER_OWNER})" in lines[0]
    assert f"OWNER TO {OWNER}" in lines[0]
    assert "users" not in lines[0]  # only the ones it does not own
    part = ("grants", "--app-login", APP_LOGIN_ROLE, "--part")
    assert _cli(foreign_table, services, *part, "owner")[0] == cli.EXIT_FAILED
    code, _, err = _cli(foreign_table, services, *part, "dba")
    assert (code, err) == (cli.EXIT_OK, "")  # the DBA's part does not depend on it
    with owner_engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql(f"ALTER TABLE dripiq_app.contact_campaigns OWNER TO {OWNER}")
    code, owner_part, err = _cli(foreign_table, services, *part, "owner")
    assert (code, err) == (cli.EXIT_OK, "")
    run_psql(_psql_url(foreign_table), owner_part)  # as the owner


def _step_headings() -> list[str]:
    return [line[3:] for line in GUIDE.splitlines() if line[:3] == "## " and line[3].isdigit()]


def _run_guide_block(
    step: str, settings: Settings, services: Services, dba_url: str, app_login: str, tmp: Path
) -> None:
    """The ```bash block of the guide's step ``step``, word for word: its tenantvault
    commands as the owner (the export it starts with), its psql runs as the login
    each names (<dba>: the tests' superuser; <owner>: the schema's owner)."""
    section = GUIDE.split(f"\n## {step}", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    urls = {"<dba>": dba_url, "<owner>": _psql_url(settings)}
    for line in block.replace("<app_login>", app_login).splitlines():
        words = line.split()
        if words[0] == "export":
            assert "<owner>" in line  # the commands run as the owner
        elif words[0] == "tenantvault":
            command, _, target = line.partition(" > ")
            code, out, err = _cli(settings, services, *command.split()[1:])
            assert (code, err) == (cli.EXIT_OK, ""), line
            if target:
                (tmp / target.strip()).write_text(out)
        elif words[0] == "psql":
            role = next(r for r in urls if r in line)
            run_psql(urls[role], (tmp / words[-1]).read_text())
        else:
            raise AssertionError(f"a line the test does not know how to run: {line}")


def test_the_app_login_is_set_up_before_adoption_and_never_needs_the_owner(
    live_database: Settings,
    owner_engine: sa.Engine,
    services: Services,
    tmp_path: Path,
) -> None:
    """Item 13: the guide sets up the application's login (step 5) before adoption
    (step 6), so the application never runs as the owner beside tenantvault's tables;
    that login keeps working across the adoption with nothing rerun."""
    import uuid

    from tenantvault import Vault

    order = _step_headings()
    login_step = next(h for h in order if "application's login" in h)
    adopt_step = next(h for h in order if h.split(". ", 1)[1].startswith("Adopt"))
    assert order.index(login_step) < order.index(adopt_step), order
    login = f"tv_app_{uuid.uuid4().hex[:8]}"
    with owner_engine.connect() as connection:  # a DBA makes the login
        connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql(f"CREATE ROLE {login} LOGIN")
    dba_url = owner_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    _run_guide_block(login_step, live_database, services, dba_url, login, tmp_path)
    url = live_database.sqlalchemy_url.set(username=login).render_as_string(hide_password=False)
    app = sa.create_engine(url)
    with app.begin() as connection:  # the application on its own tables, before adoption
        assert connection.exec_driver_sql("SELECT count(*) FROM dripiq_app.tenants").scalar() == 3
        connection.exec_driver_sql("INSERT INTO dripiq_app.organizations VALUES ('o_9', 'O')")
    _run_guide_block(adopt_step, live_database, services, dba_url, login, tmp_path)
    with owner_engine.connect() as connection:
        assert migrate.current_revision(connection, "dripiq_app") == REVISIONS[-1]
    vault = Vault.from_settings(
        load_settings(
            database_url=url,
            VAULT_ADDR=services.vault_addr,
            VAULT_TOKEN=services.vault_token,
            transit_key="tenantvault-tests",
        )
    )
    smtp = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login"}
    cfg = vault.create_config(
        "t_globex",
        type="smtp",
        name="Relay",
        config={**smtp, "user": "u"},
        credentials={"password": "pw-1"},
    )
    assert vault.load_credentials("t_globex", cfg.id).password.get_secret_value() == "pw-1"  # type: ignore[union-attr]
    vault.dispose()
    with app.connect() as connection:  # still tenant-scoped: nothing without a tenant
        count = "SELECT count(*) FROM dripiq_app.email_provider_configs"
        assert connection.exec_driver_sql(count).scalar() == 0
    app.dispose()


def _security_policy(section: str) -> list[str]:
    """The ```hcl blocks of SECURITY.md's section ``section``."""
    text = (Path(__file__).parents[2] / "SECURITY.md").read_text()
    part = text.split(f"\n### {section}\n", 1)[1].split("\n### ", 1)[0]
    return [block.split("```", 1)[0] for block in part.split("```hcl\n")[1:]]


def _policy_token(services: Services, name: str, hcl: str) -> str:
    import hvac

    root = hvac.Client(url=services.vault_addr, token=services.vault_token)
    # The policy names the key "tenantvault"; the tests' key is "tenantvault-tests".
    hcl = hcl.replace('/tenantvault"', '/tenantvault-tests"').replace(
        "/tenantvault/", "/tenantvault-tests/"
    )
    root.sys.create_or_update_policy(name, hcl)
    return str(root.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"])


def test_status_exits_0_as_the_owner_with_exactly_the_operators_policy(
    live_database: Settings, services: Services
) -> None:
    """Item 12: the guide's "exit 0" with SECURITY.md's operator policy (its two
    blocks: what the application's token may, and what the operator's adds)."""
    migrate.upgrade(live_database, adopt=True)
    application, operator = _security_policy("Vault policy (least privilege)")
    token = _policy_token(services, "tv-operator-doc", application + operator)
    code, out, err = _cli(live_database, services, "status", VAULT_TOKEN=token)
    assert (code, err) == (cli.EXIT_OK, ""), out
    assert "reachable, engine mounted" in out
    assert "not checked" not in out


def test_status_as_the_app_login_says_of_transit_what_the_guide_says(
    live_database: Settings, services: Services
) -> None:
    """Item 12: the transit lines the app login's status prints are the guide's."""
    migrate.upgrade(live_database, adopt=True)
    (application, _) = _security_policy("Vault policy (least privilege)")
    app_settings = load_settings(
        database_url=live_database.sqlalchemy_url.set(username=APP_LOGIN_ROLE).render_as_string(
            hide_password=False
        ),
        VAULT_ADDR=services.vault_addr,
        VAULT_TOKEN=services.vault_token,
    )
    guide = " ".join(GUIDE.split("\n## 7. Verify", 1)[1].split("\n## ", 1)[0].split())
    for token, line in (
        (
            _policy_token(services, "tv-app-doc", application),
            "not checked: the token may not list the secrets engines (read sys/mounts)",
        ),
        (
            "s.not-a-token",
            "the token was refused (not a valid token: mistyped, expired or revoked)",
        ),
    ):
        code, out, err = _cli(app_settings, services, "status", VAULT_TOKEN=token)
        assert (code, err) == (cli.EXIT_UNHEALTHY, ""), out
        transit = [row for row in out.splitlines() if row.startswith("transit ")]
        assert len(transit) == 1, out
        assert transit[0].endswith(f": {line}"), out
        assert line in guide  # documented where the DBA meets it


def test_a_rendered_downgrade_stopped_by_psql_names_the_command_that_renders_the_rest(
    live_database: Settings, owner_engine: sa.Engine, services: Services, tmp_path: Path
) -> None:
    """Item 15: the hint of a guard in a script rendered by `tenantvault migrate --sql
    --downgrade` is tenantvault's command, from where the database stopped, not
    Alembic's -x flag; following it finishes the downgrade. The guide quotes it."""
    from tests.support import PsqlError

    migrate.upgrade(live_database, adopt=True)
    with owner_engine.begin() as connection:  # a usage counter: 0008's downgrade deletes it
        connection.exec_driver_sql(
            "INSERT INTO dripiq_app.email_provider_usage (tenant_id, config_id, day, last_used_at) "
            "SELECT tenant_id, id, current_date, now() FROM dripiq_app.email_provider_configs LIMIT 1"
        )
    owner_url = _psql_url(live_database)
    render = ("migrate", "--sql", "--downgrade", "--revision", REVISIONS[0])
    code, script, err = _cli(live_database, services, *render)
    assert (code, err) == (cli.EXIT_OK, "")
    with pytest.raises(PsqlError) as stopped:
        run_psql(owner_url, script)
    hints = [line for line in str(stopped.value).splitlines() if line.startswith("HINT:")]
    assert len(hints) == 1, stopped.value
    command = (
        f"tenantvault migrate --sql --downgrade --revision {REVISIONS[0]} --allow-data-loss "
        "--from 0008_audit_and_lifecycle"
    )
    assert hints[0].endswith(command)
    assert "-x" not in hints[0]
    assert "the database is at 0008_audit_and_lifecycle" in hints[0]
    assert hints[0] in GUIDE  # the guide quotes it as psql prints it
    with owner_engine.connect() as connection:
        assert migrate.current_revision(connection, "dripiq_app") == "0008_audit_and_lifecycle"
    code, rest, err = _cli(live_database, services, *command.split()[1:])
    assert (code, err) == (cli.EXIT_OK, "")
    run_psql(owner_url, rest)
    with owner_engine.connect() as connection:
        assert migrate.current_revision(connection, "dripiq_app") == REVISIONS[0]


def test_the_rendered_adoption_says_its_role_blocks_do_nothing_after_step_2(
    live_database: Settings, owner_engine: sa.Engine
) -> None:
    """Item 16: the CREATE ROLE and GRANT ... TO CURRENT_USER blocks a reviewer meets
    in adopt.sql say, where they are, that they do nothing after step 2; the guide's
    step 3 says so too; and the owner, who may not create roles, runs the script."""
    from tenantvault.db.migration_support import MigrationOptions

    script = migrate.offline_sql(MigrationOptions(), adopt=True)
    blocks = [b for b in script.split("DO $$") if "CREATE ROLE" in b or "TO CURRENT_USER" in b]
    assert len(blocks) == 2
    for block in blocks:
        comment = " ".join(
            line.strip().removeprefix("-- ") for line in block.splitlines() if "--" in line
        )
        assert "step 2" in comment, block
        assert "this block does nothing" in comment, block
    step_3 = " ".join(GUIDE.split("\n## 3.", 1)[1].split("\n## ", 1)[0].split())
    assert "TO CURRENT_USER" in step_3
    assert "after step 2 nothing is" in step_3
    run_psql(_psql_url(live_database), script)
    with owner_engine.connect() as connection:
        assert migrate.current_revision(connection, "dripiq_app") == REVISIONS[-1]


def test_a_downgrade_and_upgrade_leave_the_dropped_columns_the_guide_names(
    live_database: Settings, owner_engine: sa.Engine
) -> None:
    """Item 17: each downgrade below 0003 and upgrade again leaves two dropped columns
    in the application's sender table (PostgreSQL keeps a dropped column's slot); the
    guide says so."""
    dropped = (
        "SELECT count(*) FROM pg_attribute WHERE attisdropped "
        "AND attrelid = 'dripiq_app.email_sender_identities'::regclass"
    )
    migrate.upgrade(live_database, adopt=True)
    for cycle in (1, 2):
        migrate.downgrade(live_database, REVISIONS[1], allow_data_loss=True)
        migrate.upgrade(live_database)
        with owner_engine.connect() as connection:
            assert connection.exec_driver_sql(dropped).scalar() == 2 * cycle
    roll_back = " ".join(GUIDE.split("\n## 8. Roll back", 1)[1].split())
    assert "two dropped columns" in roll_back


ANALYZE_WARNING = re.compile(r"`(WARNING:  [^`]*\"<table>\"[^`]*)`")


def test_the_owners_analyze_warns_only_as_the_backup_guide_says(
    live_database: Settings, owner_engine: sa.Engine
) -> None:
    """Item 17: docs/backup.md's step "As the owner, ANALYZE" quotes the warnings the
    owner gets (the catalogs it does not own), in 15's words and in 16+'s."""
    import psycopg

    migrate.upgrade(live_database, adopt=True)
    backup = (Path(__file__).parents[2] / "docs" / "backup.md").read_text()
    quoted = ANALYZE_WARNING.findall(" ".join(backup.split()).replace("WARNING: ", "WARNING:  "))
    assert len(quoted) >= 2, quoted
    forms = [
        re.compile(re.escape(q).replace(re.escape('"<table>"'), '"(?P<t>[^"]+)"') + "$")
        for q in quoted
    ]
    notices: list[str] = []
    url = live_database.sqlalchemy_url.set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(f"{d.severity}:  {d.message_primary}"))
        conn.execute("ANALYZE")
    assert notices  # the system catalogs it does not own
    with owner_engine.connect() as connection:
        catalogs = set(
            connection.exec_driver_sql(
                "SELECT relname FROM pg_class WHERE relnamespace IN "
                "('pg_catalog'::regnamespace, 'information_schema'::regnamespace, "
                "'pg_toast'::regnamespace)"
            ).scalars()
        )
    for notice in notices:
        match = next((m for f in forms if (m := f.match(notice))), None)
        assert match is not None, (notice, quoted)
        assert match["t"] in catalogs  # never one of the schema's tables
