"""Row-level security, seen from the application role over a real connection."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import errors

from tenantvault.db.models import EmailProviderConfig
from tenantvault.db.session import TENANT_SETTING, check_tenant_id, create_engine, tenant_session
from tenantvault.errors import InvalidInputError, TenantNotSetError
from tenantvault.settings import load_settings
from tests.support import seed_legacy

CONFIGS = "dripiq_app.email_provider_configs"
TOKENS = "dripiq_app.email_provider_tokens"
KEYS = "dripiq_app.tenant_data_keys"


@pytest.fixture
def app_connection(owner_engine: sa.Engine, app_url: str) -> Iterator[psycopg.Connection]:
    """Two tenants' configs and tokens, and a connection as the application role."""
    with owner_engine.begin() as owner:
        seed_legacy(owner)
        owner.exec_driver_sql(
            f"INSERT INTO {CONFIGS} (id, tenant_id, type, name, config) VALUES "
            "('tv_a', 't_acme', 'microsoft_graph', 'Graph', '{}'), "
            "('tv_b', 't_globex', 'google_workspace', 'GW', '{}');"
            f"INSERT INTO {TOKENS} (tenant_id, config_id) VALUES ('t_acme', 'tv_a'), ('t_globex', 'tv_b')"
        )
    with psycopg.connect(app_url) as connection:
        yield connection


def set_tenant(connection: psycopg.Connection, tenant: str) -> None:
    connection.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, tenant))


@contextmanager
def as_tenant(connection: psycopg.Connection, tenant: str) -> Iterator[None]:
    """A transaction scoped to ``tenant`` that is always rolled back."""
    with connection.transaction(force_rollback=True):
        set_tenant(connection, tenant)
        yield


def visible(connection: psycopg.Connection, table: str) -> set[str]:
    return {row[0] for row in connection.execute(f"SELECT tenant_id FROM {table}")}


def test_the_application_role_is_not_privileged(app_connection: psycopg.Connection) -> None:
    superuser, bypass = app_connection.execute(
        "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user"
    ).fetchone() or (None, None)
    assert (superuser, bypass) == (False, False)
    owners = {
        row[0]
        for row in app_connection.execute(
            "SELECT tableowner FROM pg_tables WHERE schemaname = 'dripiq_app'"
        )
    }
    member_of_owner = app_connection.execute(
        "SELECT bool_or(pg_has_role(current_user, o, 'MEMBER')) FROM unnest(%s::text[]) o",
        (list(owners),),
    ).fetchone()
    assert member_of_owner == (False,)
    assert app_connection.execute(
        "SELECT pg_has_role(current_user, 'tenantvault_migrator', 'MEMBER')"
    ).fetchone() == (False,)


def test_with_a_tenant_set_only_its_rows_are_visible(app_connection: psycopg.Connection) -> None:
    with app_connection.transaction():
        set_tenant(app_connection, "t_acme")
        assert visible(app_connection, CONFIGS) == {"t_acme"}
        assert visible(app_connection, TOKENS) == {"t_acme"}


def test_another_tenants_rows_are_untouched_by_update_and_delete(
    app_connection: psycopg.Connection, owner_engine: sa.Engine
) -> None:
    with app_connection.transaction():
        set_tenant(app_connection, "t_acme")
        updated = app_connection.execute(
            f"UPDATE {CONFIGS} SET name = 'mine' WHERE id = 'tv_b'"
        ).rowcount
        deleted = app_connection.execute(
            f"DELETE FROM {TOKENS} WHERE tenant_id = 't_globex'"
        ).rowcount
    assert (updated, deleted) == (0, 0)
    with owner_engine.connect() as owner:
        assert (
            owner.exec_driver_sql(f"SELECT name FROM {CONFIGS} WHERE id = 'tv_b'").scalar_one()
            == "GW"
        )
        assert owner.exec_driver_sql(f"SELECT count(*) FROM {TOKENS}").scalar_one() == 2


def test_inserting_a_row_for_another_tenant_is_refused(app_connection: psycopg.Connection) -> None:
    insert = f"INSERT INTO {CONFIGS} (tenant_id, type, name, config) VALUES ('t_globex', 'smtp', 'x', '{{}}')"
    with (
        as_tenant(app_connection, "t_acme"),
        pytest.raises(errors.InsufficientPrivilege, match="row-level security"),
    ):
        app_connection.execute(insert)


def test_a_row_cannot_be_moved_to_another_tenant(app_connection: psycopg.Connection) -> None:
    with (
        as_tenant(app_connection, "t_acme"),
        pytest.raises(errors.InsufficientPrivilege, match="row-level security"),
    ):
        app_connection.execute(f"UPDATE {CONFIGS} SET tenant_id = 't_globex' WHERE id = 'tv_a'")


def test_soft_deleted_rows_stay_visible_to_their_tenant(app_connection: psycopg.Connection) -> None:
    with app_connection.transaction():
        set_tenant(app_connection, "t_acme")
        app_connection.execute(f"UPDATE {CONFIGS} SET deleted_at = now() WHERE id = 'tv_a'")
        assert app_connection.execute(
            f"SELECT id FROM {CONFIGS} WHERE deleted_at IS NOT NULL"
        ).fetchall() == [("tv_a",)]


def test_without_a_tenant_nothing_is_visible_even_on_a_reused_connection(
    app_connection: psycopg.Connection,
) -> None:
    with app_connection.transaction():  # a fresh connection: the setting was never made
        assert app_connection.execute(
            "SELECT current_setting(%s, true)", (TENANT_SETTING,)
        ).fetchone() == (None,)
        assert visible(app_connection, CONFIGS) == set()
    with app_connection.transaction():  # an earlier tenant's transaction on this connection
        set_tenant(app_connection, "t_acme")
        assert visible(app_connection, CONFIGS) == {"t_acme"}
    with app_connection.transaction():  # ...has ended: the setting is '' now, not NULL
        assert app_connection.execute(
            "SELECT current_setting(%s, true)", (TENANT_SETTING,)
        ).fetchone() == ("",)
        assert visible(app_connection, CONFIGS) == set()
        assert visible(app_connection, TOKENS) == set()
        assert app_connection.execute(f"UPDATE {CONFIGS} SET name = 'x'").rowcount == 0


def test_the_application_role_cannot_hard_delete_configs(
    app_connection: psycopg.Connection,
) -> None:
    with (
        as_tenant(app_connection, "t_acme"),
        pytest.raises(errors.InsufficientPrivilege, match="permission denied"),
    ):
        app_connection.execute(f"DELETE FROM {CONFIGS} WHERE id = 'tv_a'")


def test_the_application_role_reads_only_the_sender_columns_tenantvault_needs(
    app_connection: psycopg.Connection,
) -> None:
    row = app_connection.execute(
        "SELECT id, tenant_id, provider_config_id FROM dripiq_app.email_sender_identities WHERE id = 's_acme_1'"
    ).fetchone()
    assert row == ("s_acme_1", "t_acme", None)
    with pytest.raises(errors.InsufficientPrivilege):
        app_connection.execute("SELECT email_signature FROM dripiq_app.email_sender_identities")


def test_tenant_session_scopes_orm_reads_to_its_tenant(
    app_connection: psycopg.Connection, app_url: str
) -> None:
    engine = create_engine(load_settings(database_url=app_url))
    try:
        with tenant_session(engine, "t_globex") as session:
            names = session.scalars(sa.select(EmailProviderConfig.name)).all()
        assert names == ["GW"]
        with engine.connect() as bare:  # the same pool, no tenant: nothing
            assert (
                bare.execute(
                    sa.select(sa.func.count()).select_from(EmailProviderConfig)
                ).scalar_one()
                == 0
            )
    finally:
        engine.dispose()


@pytest.mark.parametrize("bad", ["", " ", "t;DROP", "x" * 129, "t\x00"])
def test_tenant_session_refuses_a_malformed_tenant_id(bad: str) -> None:
    engine = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(TenantNotSetError), tenant_session(engine, bad):
        pass


@pytest.mark.parametrize("bad", ["", "t;DROP TABLE tenants", "x" * 129, None])
def test_a_malformed_tenant_id_is_invalid_input_naming_the_field_never_the_value(
    bad: str,
) -> None:
    with pytest.raises(InvalidInputError, match=r"^tenant_id") as raised:
        check_tenant_id(bad)
    assert isinstance(raised.value, TenantNotSetError)  # what it was before: still caught
    assert not bad or bad not in str(raised.value)


def test_the_app_role_cannot_make_a_data_key_with_a_chosen_state_or_a_false_kek_version(
    app_connection: psycopg.Connection,
) -> None:
    with as_tenant(app_connection, "t_acme"), pytest.raises(errors.InsufficientPrivilege):
        app_connection.execute(
            f"INSERT INTO {KEYS} (tenant_id, version, wrapped_key, kek_version, state) "
            "VALUES ('t_acme', 1, 'vault:v1:AAAA', 1, 'retired')"
        )
    with (
        as_tenant(app_connection, "t_acme"),
        pytest.raises(errors.CheckViolation, match="kek_version_matches"),
    ):
        app_connection.execute(
            f"INSERT INTO {KEYS} (tenant_id, version, wrapped_key, kek_version) "
            "VALUES ('t_acme', 1, 'vault:v1:AAAA', 2)"
        )
    with as_tenant(app_connection, "t_acme"):  # what tenantvault inserts still goes in
        app_connection.execute(
            f"INSERT INTO {KEYS} (tenant_id, version, wrapped_key, kek_version) "
            "VALUES ('t_acme', 1, 'vault:v2:AAAA', 2)"
        )
