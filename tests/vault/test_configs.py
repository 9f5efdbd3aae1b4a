"""The Vault facade end to end: real PostgreSQL as the application role, real OpenBao."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import InvalidInputError, NotFoundError, Vault
from tenantvault.db.session import tenant_session
from tenantvault.errors import DecryptionError
from tests.async_support import caller_transaction
from tests.conftest import CountingProvider

SENDGRID_KEY = "SG.abcdefghijk.lmnopqrstuvwxyz0123456789"
SMTP_PASSWORD = "correct horse battery staple"
GRAPH_SECRET = "graph~client~secret~value"
PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"
SMTP = {
    "host": "smtp.office365.com",
    "port": 587,
    "secure": False,
    "auth_type": "login",
    "user": "u@a.test",
}
GRAPH = {
    "azure_tenant_id": "contoso.onmicrosoft.com",
    "client_id": "0f0e0d0c-0b0a-4908-8706-050403020100",
    "scopes": ["https://graph.microsoft.com/.default"],
    "auth_type": "client_credentials",
}
GOOGLE = {
    "auth_type": "service_account",
    "project_id": "acme-mail",
    "client_email": "svc@acme-mail.iam.gserviceaccount.com",
    "delegated_user": "ceo@acme.example.com",
    "scopes": ["https://mail.google.com/"],
}

CASES = [
    ("sendgrid", {"ip_pool_name": "pool-a"}, {"api_key": SENDGRID_KEY}, "api_key", SENDGRID_KEY),
    ("smtp", SMTP, {"password": SMTP_PASSWORD}, "password", SMTP_PASSWORD),
    ("microsoft_graph", GRAPH, {"client_secret": GRAPH_SECRET}, "client_secret", GRAPH_SECRET),
    # Pasted from JSON with literal \n: stored with real newlines.
    ("google_workspace", GOOGLE, {"private_key": PEM.replace("\n", "\\n")}, "private_key", PEM),
]


def owner_rows(owner_engine: sa.Engine, table: str) -> list[Any]:
    with owner_engine.connect() as connection:
        return list(connection.execute(sa.text(f"SELECT * FROM dripiq_app.{table}")))


@pytest.mark.parametrize(
    ("kind", "config", "credentials", "field", "secret"), CASES, ids=[c[0] for c in CASES]
)
def test_credentials_round_trip_for_each_provider_type(
    vault: Vault,
    kind: str,
    config: dict[str, Any],
    credentials: dict[str, str],
    field: str,
    secret: str,
) -> None:
    created = vault.create_config(
        "t_a", type=kind, name=kind, config=config, credentials=credentials
    )
    loaded = vault.load_credentials("t_a", created.id)
    assert getattr(loaded, field).get_secret_value() == secret
    assert secret not in repr(loaded)
    again = vault.get_config("t_a", created.id, with_credentials=True)
    assert again.credentials == loaded
    stored = again.config.model_dump(mode="json", exclude_none=True)
    assert {k: stored[k] for k in config} == config


@pytest.mark.parametrize(
    ("kind", "config", "credentials", "named"),
    [
        ("smtp", {**SMTP, "port": 70000}, {"password": "x"}, "config.port"),
        ("smtp", {**SMTP, "port": 465}, {"password": "x"}, "implicit TLS"),
        ("smtp", SMTP, {}, "credentials.password"),
        ("smtp", {**SMTP, "extra": 1}, {"password": "x"}, "config.extra"),
        ("sendgrid", {}, {"api_key": "hunter2-not-a-key"}, "credentials.api_key"),
        (
            "microsoft_graph",
            {**GRAPH, "authority_url": "http://login.test"},
            {"client_secret": "s"},
            "config.authority_url",
        ),
        ("microsoft_graph", {**GRAPH, "scopes": ["Mail.Send"]}, {"client_secret": "s"}, ".default"),
        (
            "google_workspace",
            {**GOOGLE, "client_email": "not-an-email"},
            {"private_key": PEM},
            "config.client_email",
        ),
        ("google_workspace", GOOGLE, {"private_key": "hunter2-not-pem"}, "credentials.private_key"),
        ("mailgun", {}, {}, "type"),
        # PostgreSQL's jsonb cannot hold a NUL: refused by name, not as a driver error.
        ("smtp", {**SMTP, "user": "u\x00hunter2"}, {"password": "x"}, "config.user: .*NUL"),
        (
            "smtp",
            {**SMTP, "tls": {"ciphers": "HIGH\x00hunter2"}},
            {"password": "x"},
            "config.tls.ciphers: .*NUL",
        ),
    ],
)
def test_invalid_input_names_the_field_never_the_value_and_writes_nothing(
    vault: Vault,
    owner_engine: sa.Engine,
    kind: str,
    config: dict[str, Any],
    credentials: dict[str, Any],
    named: str,
) -> None:
    with pytest.raises(InvalidInputError, match=named) as error:
        vault.create_config("t_a", type=kind, name="bad", config=config, credentials=credentials)
    assert "hunter2" not in str(error.value)
    assert owner_rows(owner_engine, "email_provider_configs") == []
    assert owner_rows(owner_engine, "tenant_data_keys") == []


def test_lookups_by_default_name_sender_active_and_type(
    vault: Vault, owner_engine: sa.Engine
) -> None:
    smtp = vault.create_config(
        "t_a",
        type="smtp",
        name="Relay",
        config=SMTP,
        credentials={"password": SMTP_PASSWORD},
        is_default=True,
    )
    graph = vault.create_config(
        "t_a",
        type="microsoft_graph",
        name="Graph",
        config=GRAPH,
        credentials={"client_secret": GRAPH_SECRET},
    )
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO dripiq_app.users (id, supabase_id, email) VALUES ('u1', 's1', 'u1@a.test');"
                "INSERT INTO dripiq_app.email_sender_identities (id, tenant_id, user_id, from_email, from_name, domain) "
                "VALUES ('s1', 't_a', 'u1', 'u1@a.test', 'U', 'a.test')"
            )
        )
    with tenant_session(vault.engine, "t_a") as session:
        session.execute(
            sa.text(
                "UPDATE dripiq_app.email_sender_identities SET provider_config_id = :c WHERE id = 's1'"
            ),
            {"c": graph.id},
        )
    assert vault.get_default_config("t_a").id == smtp.id
    assert vault.get_config_by_name("t_a", "Graph").id == graph.id
    sender = vault.get_config_for_sender("t_a", "s1", with_credentials=True)
    assert sender.id == graph.id
    assert sender.credentials is not None
    assert [c.name for c in vault.list_active_configs("t_a")] == ["Graph", "Relay"]
    assert [c.id for c in vault.list_configs_of_type("t_a", "smtp")] == [smtp.id]
    vault.set_default("t_a", graph.id)
    assert vault.get_default_config("t_a").id == graph.id
    assert vault.get_config("t_a", smtp.id).is_default is False
    vault.deactivate_config("t_a", graph.id)
    with pytest.raises(NotFoundError):
        vault.get_default_config("t_a")
    assert [c.name for c in vault.list_active_configs("t_a")] == ["Relay"]
    vault.delete_config("t_a", smtp.id)
    with pytest.raises(NotFoundError):
        vault.get_config("t_a", smtp.id)
    vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": "x"}
    )


def test_another_tenant_cannot_read_or_touch_a_config(vault: Vault) -> None:
    created = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": SMTP_PASSWORD}
    )
    with pytest.raises(NotFoundError):
        vault.load_credentials("t_b", created.id)
    with pytest.raises(NotFoundError):
        vault.delete_config("t_b", created.id)
    assert vault.load_credentials("t_a", created.id).password is not None  # type: ignore[union-attr]


def test_update_changes_config_and_credentials_together(vault: Vault) -> None:
    created = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": "old"}
    )
    vault.update_config(
        "t_a",
        created.id,
        config={**SMTP, "port": 465, "secure": True},
        credentials={"password": "new"},
    )
    config = vault.get_config("t_a", created.id, with_credentials=True)
    assert config.config.port == 465  # type: ignore[union-attr]
    assert config.credentials.password.get_secret_value() == "new"  # type: ignore[union-attr]
    with pytest.raises(InvalidInputError, match="implicit TLS"):
        vault.update_config("t_a", created.id, config={**SMTP, "port": 465})
    vault.store_credentials("t_a", created.id, {"password": "newer"})
    assert vault.load_credentials("t_a", created.id).password.get_secret_value() == "newer"  # type: ignore[union-attr]


def test_many_credentials_of_one_tenant_open_with_one_key_fetch(
    vault: Vault, provider: CountingProvider
) -> None:
    ids = [
        vault.create_config(
            "t_a", type="smtp", name=f"R{i}", config=SMTP, credentials={"password": f"p{i}"}
        ).id
        for i in range(5)
    ]
    vault.keyring.cache.clear()
    before = provider.calls.get("unwrap", 0)
    opened = vault.load_many_credentials("t_a", ids)
    assert {i: c.password.get_secret_value() for i, c in opened.items()} == {
        i: f"p{n}" for n, i in enumerate(ids)
    }  # type: ignore[union-attr]
    assert provider.calls["unwrap"] - before == 1


def test_oauth_tokens_are_sealed_and_expiry_stays_queryable(
    vault: Vault, owner_engine: sa.Engine
) -> None:
    config = vault.create_config(
        "t_a",
        type="google_workspace",
        name="GW",
        config={**GOOGLE, "auth_type": "oauth2", "client_id": "c1"},
        credentials={"client_secret": "gcs"},
    )
    now = datetime(2026, 11, 25, 12, tzinfo=UTC)
    vault.store_oauth_token(
        "t_a",
        config.id,
        access_token="access-1",
        refresh_token="refresh-1",
        expires_at=now + timedelta(minutes=5),
        scopes=["https://mail.google.com/"],
    )
    vault.store_oauth_token(
        "t_a",
        config.id,
        access_token="access-2",
        refresh_token="refresh-2",
        expires_at=now + timedelta(minutes=50),
        scopes=["https://mail.google.com/"],
    )
    token = vault.load_oauth_token("t_a", config.id)
    assert token.access_token is not None
    assert token.refresh_token is not None
    assert (token.access_token.get_secret_value(), token.refresh_token.get_secret_value()) == (
        "access-2",
        "refresh-2",
    )
    assert token.expires_at == now + timedelta(minutes=50)
    rows = owner_rows(owner_engine, "email_provider_tokens")
    assert len(rows) == 1
    assert "access-2" not in repr(rows)
    expiring = vault.tokens_expiring("t_a", within=timedelta(hours=1), now=now)
    assert [(e.config_id, e.refreshable) for e in expiring] == [(config.id, True)]
    assert vault.tokens_expiring("t_a", within=timedelta(minutes=10), now=now) == []
    assert vault.delete_oauth_token("t_a", config.id) is True
    with pytest.raises(NotFoundError):
        vault.load_oauth_token("t_a", config.id)


def test_a_call_can_join_the_callers_transaction(vault: Vault, owner_engine: sa.Engine) -> None:
    with caller_transaction(vault) as session:
        vault.create_config(
            "t_a",
            type="smtp",
            name="Atomic",
            config=SMTP,
            credentials={"password": "p"},
            session=session,
        )
        session.rollback()
    assert owner_rows(owner_engine, "email_provider_configs") == []
    with caller_transaction(vault) as session:
        created = vault.create_config(
            "t_a",
            type="smtp",
            name="Atomic",
            config=SMTP,
            credentials={"password": "p"},
            session=session,
        )
    assert vault.get_config("t_a", created.id).name == "Atomic"


def test_a_sealed_value_moved_to_another_row_does_not_open(
    vault: Vault, owner_engine: sa.Engine
) -> None:
    first = vault.create_config(
        "t_a", type="smtp", name="One", config=SMTP, credentials={"password": "one"}
    )
    second = vault.create_config(
        "t_a", type="smtp", name="Two", config=SMTP, credentials={"password": "two"}
    )
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.email_provider_configs SET encrypted_credentials = "
                "(SELECT encrypted_credentials FROM dripiq_app.email_provider_configs WHERE id = :a) WHERE id = :b"
            ),
            {"a": first.id, "b": second.id},
        )
    with pytest.raises(DecryptionError, match=r"^cannot open sealed value$"):
        vault.load_credentials("t_a", second.id)


def test_a_wrapped_key_copied_to_another_tenant_cannot_be_unwrapped(
    vault: Vault, owner_engine: sa.Engine
) -> None:
    vault.create_config(
        "t_a", type="smtp", name="One", config=SMTP, credentials={"password": "one"}
    )
    theirs = vault.create_config(
        "t_b", type="smtp", name="One", config=SMTP, credentials={"password": "two"}
    )
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.tenant_data_keys SET wrapped_key = "
                "(SELECT wrapped_key FROM dripiq_app.tenant_data_keys WHERE tenant_id = 't_a') WHERE tenant_id = 't_b'"
            )
        )
    vault.keyring.cache.clear()
    with pytest.raises(DecryptionError):
        vault.load_credentials("t_b", theirs.id)


def test_concurrent_first_use_makes_one_data_key_and_one_unwrap_per_cold_load(
    vault: Vault, provider: CountingProvider, owner_engine: sa.Engine
) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        try:
            barrier.wait(10)
            vault.create_config(
                "t_b", type="smtp", name=f"C{i}", config=SMTP, credentials={"password": f"p{i}"}
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    keys = [r for r in owner_rows(owner_engine, "tenant_data_keys") if r.tenant_id == "t_b"]
    assert [(k.version, k.state) for k in keys] == [(1, "active")]
    ids = [c.id for c in vault.list_active_configs("t_b")]
    vault.keyring.cache.clear()
    before = provider.calls.get("unwrap", 0)
    loaded: list[Any] = []
    barrier2 = threading.Barrier(len(ids))

    def load(config_id: str) -> None:
        barrier2.wait(10)
        loaded.append(vault.load_credentials("t_b", config_id))

    threads = [threading.Thread(target=load, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(loaded) == 8
    assert provider.calls["unwrap"] - before == 1


def test_the_one_round_trip_load_leaves_no_tenant_on_the_pooled_connection(vault: Vault) -> None:
    created = vault.create_config(
        "t_a", type="smtp", name="R", config=SMTP, credentials={"password": "p"}
    )
    vault.load_credentials("t_a", created.id)  # caches the key: the next loads take the fast path
    assert vault.keyring.cache.get("t_a", 1) is not None
    for _ in range(3):
        assert vault.load_credentials("t_a", created.id).password.get_secret_value() == "p"  # type: ignore[union-attr]
    with vault.engine.connect() as connection:
        assert connection.execute(
            sa.text("SELECT current_setting('tenantvault.tenant_id', true)")
        ).scalar() in ("", None)
        assert (
            connection.execute(
                sa.text("SELECT count(*) FROM dripiq_app.email_provider_configs")
            ).scalar_one()
            == 0
        )
    with pytest.raises(NotFoundError):
        vault.load_credentials("t_b", created.id)


def test_a_config_change_that_no_longer_fits_the_stored_credentials_is_refused(
    vault: Vault,
) -> None:
    created = vault.create_config(
        "t_a", type="smtp", name="R", config=SMTP, credentials={"password": "p"}
    )
    with pytest.raises(
        InvalidInputError, match=r"credentials\.password: not used with auth_type oauth2"
    ):
        vault.update_config("t_a", created.id, config={**SMTP, "auth_type": "oauth2"})
    assert vault.get_config("t_a", created.id).config.auth_type == "login"  # type: ignore[union-attr]
    vault.update_config("t_a", created.id, config={**SMTP, "auth_type": "oauth2"}, credentials={})
    assert vault.get_config("t_a", created.id).config.auth_type == "oauth2"  # type: ignore[union-attr]


def test_a_nul_in_a_name_or_scope_is_refused_by_name_not_by_the_driver(
    vault: Vault, owner_engine: sa.Engine
) -> None:
    with pytest.raises(InvalidInputError, match=r"^name: must be printable text$"):
        vault.create_config(
            "t_a", type="smtp", name="Re\x00lay", config=SMTP, credentials={"password": "p"}
        )
    cfg = vault.create_config("t_a", type="microsoft_graph", name="G", config=GRAPH)
    with pytest.raises(InvalidInputError, match=r"^scopes: "):
        vault.store_oauth_token("t_a", cfg.id, access_token="a", scopes=["Mail.\x00Send"])
    with pytest.raises(InvalidInputError, match=r"^name: must be printable text$"):
        vault.update_config("t_a", cfg.id, name="G\x00")
    assert [r.name for r in owner_rows(owner_engine, "email_provider_configs")] == ["G"]
