"""Integrity rules the database itself enforces: uniqueness among live rows, one default
per tenant, tenant-scoped foreign keys, cascades, SET NULL, and the timestamp trigger."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from tenantvault.ops import migrate
from tenantvault.settings import Settings
from tests.support import seed_legacy


@pytest.fixture
def db(settings: Settings, owner_engine: sa.Engine) -> Iterator[sa.Connection]:
    """A migrated database with the legacy seed, as the (superuser) owner; rolled back after."""
    migrate.upgrade(settings)
    with owner_engine.connect() as connection:
        seed_legacy(connection)
        connection.commit()
        yield connection
        connection.rollback()


def run(connection: sa.Connection, sql: str, **params: object) -> sa.CursorResult[object]:
    return connection.execute(sa.text(sql), params)


def add_config(connection: sa.Connection, tenant: str, name: str, **columns: object) -> str:
    values = {"type": "smtp", "config": "{}", "is_default": False, "is_active": True, **columns}
    return str(
        run(
            connection,
            "INSERT INTO dripiq_app.email_provider_configs (tenant_id, name, type, config, is_default, is_active) "
            "VALUES (:tenant, :name, :type, CAST(:config AS jsonb), :is_default, :is_active) RETURNING id",
            tenant=tenant,
            name=name,
            **values,
        ).scalar_one()
    )


def refused(connection: sa.Connection, sql: str, constraint: str, **params: object) -> None:
    with pytest.raises(IntegrityError, match=constraint), connection.begin_nested():
        run(connection, sql, **params)


def test_database_makes_ids_of_the_documented_shape(db: sa.Connection) -> None:
    config_id = add_config(db, "t_globex", "Relay")
    assert re.fullmatch(r"tv[0-9a-f]{32}", config_id)


def test_name_is_unique_among_live_configs_only(db: sa.Connection) -> None:
    first = add_config(db, "t_globex", "Relay")
    refused(
        db,
        "INSERT INTO dripiq_app.email_provider_configs (tenant_id, name, type, config) "
        "VALUES ('t_globex', 'Relay', 'smtp', '{}')",
        "uq_email_provider_configs_tenant_id_name_live",
    )
    add_config(db, "t_initech", "Relay")  # another tenant may use the name
    run(
        db,
        "UPDATE dripiq_app.email_provider_configs SET deleted_at = now() WHERE id = :id",
        id=first,
    )
    add_config(db, "t_globex", "Relay")  # a deleted config frees its name


def test_one_default_per_tenant_and_a_default_is_live_and_active(db: sa.Connection) -> None:
    first = add_config(db, "t_globex", "A", is_default=True)
    refused(
        db,
        "INSERT INTO dripiq_app.email_provider_configs (tenant_id, name, type, config, is_default) "
        "VALUES ('t_globex', 'B', 'smtp', '{}', true)",
        "uq_email_provider_configs_tenant_id_default",
    )
    refused(
        db,
        "UPDATE dripiq_app.email_provider_configs SET deleted_at = now() WHERE id = :id",
        "ck_email_provider_configs_default_is_live",
        id=first,
    )
    refused(
        db,
        "UPDATE dripiq_app.email_provider_configs SET is_active = false WHERE id = :id",
        "ck_email_provider_configs_default_is_live",
        id=first,
    )
    # Switching the default in one transaction: clear, then set.
    second = add_config(db, "t_globex", "B")
    run(
        db,
        "UPDATE dripiq_app.email_provider_configs SET is_default = (id = :id) "
        "WHERE tenant_id = 't_globex' AND deleted_at IS NULL",
        id=second,
    )
    defaults = (
        run(
            db,
            "SELECT id FROM dripiq_app.email_provider_configs WHERE tenant_id = 't_globex' AND is_default",
        )
        .scalars()
        .all()
    )
    assert defaults == [second]


@pytest.mark.parametrize(
    ("sql", "constraint"),
    [
        (
            "INSERT INTO dripiq_app.email_provider_configs (tenant_id, name, type, config) "
            "VALUES ('t_globex', 'X', 'mailgun', '{}')",
            "ck_email_provider_configs_type",
        ),
        (
            "INSERT INTO dripiq_app.email_provider_configs (tenant_id, name, type, config) "
            "VALUES ('t_globex', '  ', 'smtp', '{}')",
            "ck_email_provider_configs_name_not_blank",
        ),
        (
            "INSERT INTO dripiq_app.email_provider_configs (tenant_id, name, type, config) "
            "VALUES ('t_globex', 'X', 'smtp', '[1, 2]')",
            "ck_email_provider_configs_config_is_object",
        ),
        (
            "INSERT INTO dripiq_app.email_provider_configs (tenant_id, name, type, config) "
            "VALUES ('t_nobody', 'X', 'smtp', '{}')",
            "fk_email_provider_configs_tenant_id_tenants",
        ),
    ],
    ids=["unknown-type", "blank-name", "config-not-object", "unknown-tenant"],
)
def test_invalid_config_rows_are_refused(db: sa.Connection, sql: str, constraint: str) -> None:
    refused(db, sql, constraint)


def test_a_token_cannot_point_at_another_tenants_config(db: sa.Connection) -> None:
    acme_config = add_config(db, "t_acme", "Graph", type="microsoft_graph")
    refused(
        db,
        "INSERT INTO dripiq_app.email_provider_tokens (tenant_id, config_id) VALUES ('t_globex', :c)",
        "fk_email_provider_tokens_config",
        c=acme_config,
    )


def test_a_sender_cannot_point_at_another_tenants_config(db: sa.Connection) -> None:
    acme_config = add_config(db, "t_acme", "Relay")
    refused(
        db,
        "UPDATE dripiq_app.email_sender_identities SET provider_config_id = :c WHERE id = 's_globex_1'",
        "fk_email_sender_identities_provider_config",
        c=acme_config,
    )


def test_one_token_row_per_config(db: sa.Connection) -> None:
    config = add_config(db, "t_globex", "GW", type="google_workspace")
    run(
        db,
        "INSERT INTO dripiq_app.email_provider_tokens (tenant_id, config_id) VALUES ('t_globex', :c)",
        c=config,
    )
    refused(
        db,
        "INSERT INTO dripiq_app.email_provider_tokens (tenant_id, config_id) VALUES ('t_globex', :c)",
        "uq_email_provider_tokens_tenant_id_config_id",
        c=config,
    )


def test_deleting_a_config_removes_its_tokens_and_unlinks_senders_keeping_their_tenant(
    db: sa.Connection,
) -> None:
    config = add_config(db, "t_globex", "GW", type="google_workspace")
    run(
        db,
        "INSERT INTO dripiq_app.email_provider_tokens (tenant_id, config_id) VALUES ('t_globex', :c)",
        c=config,
    )
    run(
        db,
        "UPDATE dripiq_app.email_sender_identities SET provider_config_id = :c WHERE id = 's_globex_1'",
        c=config,
    )
    run(db, "DELETE FROM dripiq_app.email_provider_configs WHERE id = :c", c=config)
    assert run(db, "SELECT count(*) FROM dripiq_app.email_provider_tokens").scalar_one() == 0
    sender = run(
        db,
        "SELECT tenant_id, provider_config_id FROM dripiq_app.email_sender_identities WHERE id = 's_globex_1'",
    ).one()
    assert tuple(sender) == ("t_globex", None)


def test_deleting_a_tenant_cascades_to_configs_tokens_and_senders(db: sa.Connection) -> None:
    config = add_config(db, "t_globex", "GW", type="google_workspace")
    add_config(db, "t_acme", "GW", type="google_workspace")
    run(
        db,
        "INSERT INTO dripiq_app.email_provider_tokens (tenant_id, config_id) VALUES ('t_globex', :c)",
        c=config,
    )
    run(db, "DELETE FROM dripiq_app.tenants WHERE id = 't_globex'")
    for table in ("email_provider_configs", "email_provider_tokens", "email_sender_identities"):
        assert (
            run(
                db, f"SELECT count(*) FROM dripiq_app.{table} WHERE tenant_id = 't_globex'"
            ).scalar_one()
            == 0
        )
    assert (
        run(
            db, "SELECT count(*) FROM dripiq_app.email_provider_configs WHERE tenant_id = 't_acme'"
        ).scalar_one()
        == 1
    )


def test_updated_at_is_kept_by_the_database_and_created_at_never_moves(db: sa.Connection) -> None:
    config = add_config(db, "t_globex", "Relay")
    run(
        db,
        "UPDATE dripiq_app.email_provider_configs SET created_at = '2000-01-01', "
        "updated_at = '2000-01-01' WHERE id = :c",
        c=config,
    )
    created, updated, now = run(
        db,
        "SELECT created_at, updated_at, timezone('utc', now()) FROM dripiq_app.email_provider_configs WHERE id = :c",
        c=config,
    ).one()
    assert created.year != 2000
    assert updated == now  # the trigger's value, not the one written
