"""What the README promises about tenant ids, against real PostgreSQL and OpenBao:
a tenant without a row in ``tenants`` and a malformed tenant id are invalid input."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tenantvault import InvalidInputError, TenantNotSetError, Vault
from tests.async_support import caller_transaction

SMTP = {
    "host": "smtp.office365.com",
    "port": 587,
    "secure": False,
    "auth_type": "login",
    "user": "mailer@acme.example",
}
GHOST = "t_ghost"  # well-formed, but no row in tenants


def _rows(owner_engine: sa.Engine, table: str) -> int:
    with owner_engine.connect() as connection:
        return int(
            connection.execute(
                sa.text(f"SELECT count(*) FROM dripiq_app.{table} WHERE tenant_id = :t"),
                {"t": GHOST},
            ).scalar_one()
        )


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param({"password": "correct horse"}, id="sealing-makes-the-first-data-key"),
        pytest.param(None, id="the-config-row-alone"),
    ],
)
def test_create_config_for_a_tenant_without_a_row_is_invalid_input(
    vault: Vault, owner_engine: sa.Engine, credentials: dict[str, str] | None
) -> None:
    # With credentials the first write to refuse is the tenant's first data key
    # (fk_tenant_data_keys_tenant_id_tenants); without, the config row
    # (fk_email_provider_configs_tenant_id_tenants): an OAuth SMTP config, which needs no
    # password.
    config = SMTP if credentials else {**SMTP, "auth_type": "oauth2"}
    with pytest.raises(InvalidInputError, match=f"^tenant_id: tenant {GHOST} does not exist"):
        vault.create_config(
            GHOST, type="smtp", name="Relay", config=config, credentials=credentials
        )
    for table in ("email_provider_configs", "email_provider_config_versions", "tenant_data_keys"):
        assert _rows(owner_engine, table) == 0, table


def test_a_refused_unknown_tenant_leaves_the_callers_transaction_usable(vault: Vault) -> None:
    with caller_transaction(vault) as session:
        with pytest.raises(InvalidInputError, match=f"tenant {GHOST} does not exist"):
            vault.create_config(
                GHOST,
                type="smtp",
                name="Relay",
                config=SMTP,
                credentials={"password": "correct horse"},
                session=session,
            )
        created = vault.create_config(
            "t_a",
            type="smtp",
            name="Relay",
            config=SMTP,
            credentials={"password": "correct horse"},
            session=session,
        )
    assert vault.get_config("t_a", created.id).name == "Relay"


@pytest.mark.parametrize("bad", ["", "t;DROP TABLE tenants", "x" * 129, "t\x00a", "tenant a"])
def test_a_malformed_tenant_id_is_invalid_input_naming_the_field(vault: Vault, bad: str) -> None:
    calls = [
        lambda: vault.create_config(
            bad, type="smtp", name="Relay", config=SMTP, credentials={"password": "p"}
        ),
        lambda: vault.load_credentials(bad, "cfg_1"),
        lambda: vault.list_active_configs(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidInputError) as raised:
            call()
        assert isinstance(raised.value, TenantNotSetError)  # what it raised before
        message = str(raised.value)
        assert message.startswith("tenant_id")
        assert not bad or bad not in message
