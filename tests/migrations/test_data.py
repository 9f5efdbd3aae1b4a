"""Upgrades with the application's data present: nothing lost, defaults made once,
senders linked; downgrades that would lose data refuse unless acknowledged."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tenantvault.errors import MigrationError
from tenantvault.ops import migrate
from tenantvault.settings import Settings
from tests.support import REVISIONS, legacy_rows, seed_legacy, stamp, table_rows

(
    BASELINE,
    PROVIDER_TABLES,
    SENDER_LINKS,
    SENDGRID_DATA,
    DATA_KEYS,
    _,
    VERSIONS,
    AUDIT,
    BINDINGS,
) = REVISIONS[:9]
HEAD = REVISIONS[-1]


@pytest.fixture
def seeded(settings: Settings, owner_engine: sa.Engine) -> dict[str, list[tuple[object, ...]]]:
    """A database at the baseline holding the application's rows; returns those rows."""
    migrate.upgrade(settings, BASELINE)
    with owner_engine.begin() as connection:
        seed_legacy(connection)
        return legacy_rows(connection)


def _links(connection: sa.Connection) -> dict[str, str | None]:
    rows = connection.execute(
        sa.text(
            "SELECT esi.id, c.tenant_id || '/' || c.name FROM dripiq_app.email_sender_identities esi "
            "LEFT JOIN dripiq_app.email_provider_configs c "
            "  ON c.tenant_id = esi.tenant_id AND c.id = esi.provider_config_id ORDER BY esi.id"
        )
    )
    return {sender: link for sender, link in rows}


def test_upgrade_with_data_keeps_every_legacy_row_and_links_sendgrid_senders(
    settings: Settings, owner_engine: sa.Engine, seeded: dict[str, list[tuple[object, ...]]]
) -> None:
    migrate.upgrade(settings)
    with owner_engine.connect() as connection:
        assert legacy_rows(connection) == seeded
        configs = connection.execute(
            sa.text(
                "SELECT tenant_id, type, name, config, is_default, is_active, encrypted_credentials "
                "FROM dripiq_app.email_provider_configs ORDER BY tenant_id"
            )
        ).all()
        links = _links(connection)
    assert [tuple(c) for c in configs] == [
        ("t_acme", "sendgrid", "SendGrid (Default)", {"legacy": True}, True, True, None),
        ("t_initech", "sendgrid", "SendGrid (Default)", {"legacy": True}, True, True, None),
    ]
    assert links == {
        "s_acme_1": "t_acme/SendGrid (Default)",
        "s_acme_2": "t_acme/SendGrid (Default)",
        "s_acme_3": None,  # no SendGrid sender id: nothing to link
        "s_globex_1": None,
        "s_initech_1": "t_initech/SendGrid (Default)",
    }


def test_data_migration_run_twice_changes_nothing(
    settings: Settings, owner_engine: sa.Engine, seeded: object
) -> None:
    migrate.upgrade(settings)
    with owner_engine.connect() as connection:
        first = {
            t: table_rows(connection, t)
            for t in ("email_provider_configs", "email_sender_identities")
        }
    stamp(settings, SENDER_LINKS)  # pretend it never ran, so upgrade runs it again
    migrate.upgrade(settings, SENDGRID_DATA)
    stamp(settings, HEAD)
    with owner_engine.connect() as connection:
        second = {
            t: table_rows(connection, t)
            for t in ("email_provider_configs", "email_sender_identities")
        }
    assert second == first
    assert len(first["email_provider_configs"]) == 2


def test_legacy_config_is_not_default_where_the_tenant_already_has_one(
    settings: Settings, owner_engine: sa.Engine, seeded: object
) -> None:
    migrate.upgrade(settings, SENDER_LINKS)
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO dripiq_app.email_provider_configs (tenant_id, type, name, config, is_default) "
                "VALUES ('t_acme', 'smtp', 'Office 365', '{}', true)"
            )
        )
    migrate.upgrade(settings)
    with owner_engine.connect() as connection:
        defaults = connection.execute(
            sa.text(
                "SELECT name, is_default FROM dripiq_app.email_provider_configs "
                "WHERE tenant_id = 't_acme' ORDER BY name"
            )
        ).all()
    assert [tuple(d) for d in defaults] == [("Office 365", True), ("SendGrid (Default)", False)]


def test_downgrade_to_base_and_back_up_with_data(
    settings: Settings, owner_engine: sa.Engine, seeded: dict[str, list[tuple[object, ...]]]
) -> None:
    migrate.upgrade(settings)
    migrate.downgrade(settings, BASELINE)  # only the migration's own legacy configs: no loss
    with owner_engine.connect() as connection:
        assert legacy_rows(connection) == seeded
        columns = {
            c["name"]
            for c in sa.inspect(connection).get_columns("email_sender_identities", "dripiq_app")
        }
    assert "provider_config_id" not in columns
    migrate.upgrade(settings)
    with owner_engine.connect() as connection:
        assert legacy_rows(connection) == seeded
        assert _links(connection)["s_initech_1"] == "t_initech/SendGrid (Default)"


def _add_smtp_config(owner_engine: sa.Engine) -> None:
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO dripiq_app.email_provider_configs (id, tenant_id, type, name, config) "
                "VALUES ('tvsmtp', 't_globex', 'smtp', 'Relay', '{\"host\": \"smtp.test\"}');"
                "INSERT INTO dripiq_app.email_provider_tokens (tenant_id, config_id, encrypted_access_token) "
                "VALUES ('t_globex', 'tvsmtp', 'tv2.1.c2VhbGVkLWJ5dGVz');"
                "UPDATE dripiq_app.email_sender_identities SET provider_config_id = 'tvsmtp', "
                "provider_validation_data = '{\"identity_id\": 7}' WHERE id = 's_globex_1'"
            )
        )


def test_a_refused_downgrade_names_every_blocker_with_its_count_and_changes_nothing(
    settings: Settings, owner_engine: sa.Engine, seeded: object
) -> None:
    migrate.upgrade(settings)
    _add_smtp_config(owner_engine)
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO dripiq_app.email_provider_config_versions "
                "(tenant_id, config_id, version, change, name, config) "
                "VALUES ('t_globex', 'tvsmtp', 2, 'updated', 'Relay', '{}');"
                "INSERT INTO dripiq_app.tenant_data_keys (tenant_id, version, wrapped_key, kek_version) "
                "VALUES ('t_globex', 1, 'vault:v1:d3JhcHBlZA==', 1), ('t_acme', 1, 'vault:v1:d3JhcHBlZA==', 1);"
                "INSERT INTO dripiq_app.email_provider_usage (tenant_id, config_id, day, sent, last_used_at) "
                "VALUES ('t_globex', 'tvsmtp', '2026-11-01', 3, now())"
            )
        )
    with owner_engine.connect() as connection:
        before = {t: _all_rows(connection, t) for t in TENANTVAULT_ROWS}
    with pytest.raises(MigrationError) as refused:
        migrate.downgrade(settings, BASELINE)
    assert str(refused.value) == (
        f"downgrade to {BASELINE} refused, nothing was changed: it would delete "
        f"1 usage counters [{AUDIT}]; "
        f"1 config versions (the history of configs and their sealed credentials) [{VERSIONS}]; "
        f"2 tenant data keys (every sealed credential and token would become unreadable) [{DATA_KEYS}]; "
        f"1 sender links to provider configs (provider_config_id) [{SENDER_LINKS}]; "
        f"1 sender validation data (provider_validation_data) [{SENDER_LINKS}]; "
        f"1 OAuth tokens [{PROVIDER_TABLES}]; "
        f"1 email provider configs [{PROVIDER_TABLES}]. "
        "Back them up, then rerun with --allow-data-loss"
    )
    with owner_engine.connect() as connection:
        assert migrate.current_revision(connection, "dripiq_app") == HEAD
        assert {t: _all_rows(connection, t) for t in TENANTVAULT_ROWS} == before


def _all_rows(connection: sa.Connection, table: str) -> list[tuple[object, ...]]:
    return [
        tuple(r)
        for r in connection.exec_driver_sql(f"SELECT * FROM dripiq_app.{table} ORDER BY 1, 2, 3")
    ]


TENANTVAULT_ROWS = (
    "email_provider_configs",
    "email_provider_tokens",
    "email_sender_identities",
    "email_provider_config_versions",
    "tenant_data_keys",
    "email_provider_usage",
)


def test_acknowledged_downgrade_removes_the_new_data_and_keeps_the_legacy_rows(
    settings: Settings, owner_engine: sa.Engine, seeded: dict[str, list[tuple[object, ...]]]
) -> None:
    migrate.upgrade(settings)
    _add_smtp_config(owner_engine)
    migrate.downgrade(settings, BASELINE, allow_data_loss=True)
    with owner_engine.connect() as connection:
        assert legacy_rows(connection) == seeded
        assert migrate.current_revision(connection, "dripiq_app") == BASELINE


def test_downgrade_of_the_provider_tables_refuses_while_tokens_exist(
    settings: Settings, owner_engine: sa.Engine, seeded: object
) -> None:
    migrate.upgrade(settings, PROVIDER_TABLES)
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO dripiq_app.email_provider_configs (id, tenant_id, type, name, config) "
                "VALUES ('tvg', 't_globex', 'google_workspace', 'GW', '{}');"
                "INSERT INTO dripiq_app.email_provider_tokens (tenant_id, config_id) VALUES ('t_globex', 'tvg')"
            )
        )
    with pytest.raises(MigrationError, match="OAuth tokens"):
        migrate.downgrade(settings, BASELINE)
    with owner_engine.connect() as connection:
        assert len(table_rows(connection, "email_provider_tokens")) == 1


def test_no_downgrade_goes_below_the_baseline(
    settings: Settings, owner_engine: sa.Engine, seeded: dict[str, list[tuple[object, ...]]]
) -> None:
    migrate.upgrade(settings)
    for target in ("base", f"-{len(REVISIONS)}"):
        with pytest.raises(MigrationError, match="drop the application's own tables"):
            migrate.downgrade(settings, target, allow_data_loss=True)
    with owner_engine.connect() as connection:
        assert migrate.current_revision(connection, "dripiq_app") == HEAD
        assert legacy_rows(connection) == seeded


def test_versioning_records_existing_configs_as_baseline_versions_without_credentials(
    settings: Settings, owner_engine: sa.Engine, seeded: object
) -> None:
    migrate.upgrade(settings, DATA_KEYS)
    migrate.upgrade(settings, VERSIONS)
    with owner_engine.connect() as connection:
        versions = connection.execute(
            sa.text(
                "SELECT v.tenant_id, v.version, v.change, v.name, v.config, v.encrypted_credentials, "
                "c.version FROM dripiq_app.email_provider_config_versions v "
                "JOIN dripiq_app.email_provider_configs c ON c.tenant_id = v.tenant_id AND c.id = v.config_id "
                "ORDER BY v.tenant_id"
            )
        ).all()
    assert [tuple(v) for v in versions] == [
        ("t_acme", 1, "baseline", "SendGrid (Default)", {"legacy": True}, None, 1),
        ("t_initech", 1, "baseline", "SendGrid (Default)", {"legacy": True}, None, 1),
    ]
    # Only baseline history: the downgrade loses nothing and goes through.
    migrate.downgrade(settings, DATA_KEYS)
    migrate.upgrade(settings, VERSIONS)


def test_downgrade_of_versioning_refuses_while_history_holds_changes(
    settings: Settings, owner_engine: sa.Engine, seeded: object
) -> None:
    migrate.upgrade(settings)
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO dripiq_app.email_provider_config_versions "
                "(tenant_id, config_id, version, change, name, config) "
                "SELECT tenant_id, id, 2, 'updated', name, config FROM dripiq_app.email_provider_configs "
                "WHERE tenant_id = 't_acme'"
            )
        )
    with pytest.raises(MigrationError, match=r"1 config versions \(the history"):
        migrate.downgrade(settings, DATA_KEYS)
    with owner_engine.connect() as connection:
        # Refused before anything moved: the newest revisions are still applied.
        assert migrate.current_revision(connection, "dripiq_app") == HEAD
        count = connection.execute(
            sa.text("SELECT count(*) FROM dripiq_app.email_provider_config_versions")
        ).scalar_one()
    assert count == 3


def test_a_lock_timeout_names_where_the_database_stopped(
    settings: Settings, owner_engine: sa.Engine, seeded: object
) -> None:
    quick = settings.model_copy(update={"migration_lock_timeout_ms": 200})
    with owner_engine.connect() as holder:
        # The application reading its senders: 0003 needs the table to itself.
        holder.exec_driver_sql("LOCK TABLE dripiq_app.email_sender_identities IN ACCESS SHARE MODE")
        with pytest.raises(MigrationError) as stopped:
            migrate.upgrade(quick)
        holder.rollback()
    assert str(stopped.value) == (
        f"canceling statement due to lock timeout; {SENDER_LINKS} failed and was rolled back; "
        f"the database is at {PROVIDER_TABLES}"
    )
    migrate.upgrade(settings)  # rerun: it continues from there


def test_the_replay_guards_record_the_rows_there_are_when_installed(
    settings: Settings, owner_engine: sa.Engine, seeded: dict[str, list[tuple[object, ...]]]
) -> None:
    migrate.upgrade(settings, REVISIONS[-2])
    with owner_engine.begin() as connection:
        config_id, tenant_id = connection.execute(
            sa.text("SELECT id, tenant_id FROM dripiq_app.email_provider_configs LIMIT 1")
        ).one()
        connection.execute(
            sa.text(
                "INSERT INTO dripiq_app.email_provider_tokens (tenant_id, config_id) "
                "VALUES (:t, :c)"
            ),
            {"t": tenant_id, "c": config_id},
        )
    migrate.upgrade(settings)
    with owner_engine.connect() as connection:
        marks = connection.execute(
            sa.text(
                "SELECT kind, count(*), max(history_version), count(deleted_at) "
                "FROM dripiq_app.tenantvault_sealed_rows GROUP BY kind ORDER BY kind"
            )
        ).all()
        configs = connection.execute(
            sa.text("SELECT count(*) FROM dripiq_app.email_provider_configs")
        ).scalar_one()
    assert marks == [("config", configs, 1, 0), ("token", 1, 0, 0)]
    # The baseline version 0007 kept is the config's mark: it cannot be inserted again.
    history = (
        "INSERT INTO dripiq_app.email_provider_config_versions "
        "(tenant_id, config_id, version, change, name, config) "
        "VALUES (:t, :c, :v, 'updated', 'n', '{}'::jsonb)"
    )
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text("DELETE FROM dripiq_app.email_provider_config_versions WHERE config_id = :c"),
            {"c": config_id},
        )
    refused = pytest.raises(sa.exc.IntegrityError, match="already kept a version 1 or later")
    with refused, owner_engine.begin() as connection:
        connection.execute(sa.text(history), {"t": tenant_id, "c": config_id, "v": 1})
    with owner_engine.begin() as connection:
        connection.execute(sa.text(history), {"t": tenant_id, "c": config_id, "v": 2})
