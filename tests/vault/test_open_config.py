"""A config and its secrets are one verified read (``open_config``), and every secret is
bound to its config's content and type: a writer holding the application's login who
rewrites, retypes or flips a config never gets a credential or a token served beside
it. Tokens of a soft-deleted config do not load. Real PostgreSQL (the attacker writes
as the application's own login) and real OpenBao; both facades."""

from __future__ import annotations

import base64
import os
import pickle
import struct
import threading
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tenantvault import (
    DecryptionError,
    InvalidInputError,
    MicrosoftGraphCredentials,
    NotFoundError,
    OpenedConfig,
    SendGridConfig,
    SmtpConfig,
    SmtpCredentials,
    Vault,
)
from tenantvault.db.session import tenant_session
from tenantvault.rotation.dek import rotate_data_keys
from tenantvault.rotation.options import DekRotationOptions
from tenantvault.rotation.status import key_status
from tests.async_support import sync_provider
from tests.conftest import CountingProvider, fresh_keyring
from tests.rotation_support import GRAPH, GRAPH_TOKEN, SMTP
from tests.support import record_as_the_upgrade, write_as_app

PASSWORD = "the-real-smtp-password"
OAUTH_SMTP = {**SMTP, "auth_type": "oauth2"}
HOSTILE = 'config = config || \'{"host": "smtp.attacker.example"}\''


def _rewrite(app_url: str, config_id: str, change: str) -> None:
    write_as_app(
        app_url,
        f"UPDATE dripiq_app.email_provider_configs SET {change} WHERE id = %(id)s",
        id=config_id,
    )


def _secret(value: Any) -> str:
    return str(value.get_secret_value())


def test_the_typed_accessors_give_the_expected_provider_s_models_and_refuse_another(
    vault: Vault,
) -> None:
    smtp = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": PASSWORD}
    )
    oauth = vault.create_config("t_a", type="smtp", name="OAuth relay", config=OAUTH_SMTP)
    opened = vault.open_config("t_a", smtp.id)
    assert opened.config_as(SmtpConfig) is opened.config.config
    assert _secret(opened.credentials_as(SmtpCredentials).password) == PASSWORD
    for wrong in (lambda: opened.config_as(SendGridConfig),
                  lambda: opened.credentials_as(MicrosoftGraphCredentials)):  # fmt: skip
        with pytest.raises(InvalidInputError, match=r"^model: .* is a smtp config") as refused:
            wrong()
        assert PASSWORD not in str(refused.value)
        assert SMTP["host"] not in str(refused.value)
    with pytest.raises(NotFoundError, match="has no credentials"):
        vault.open_config("t_a", oauth.id).credentials_as(SmtpCredentials)


def test_open_config_returns_the_config_its_credentials_and_its_token_together(
    vault: Vault,
) -> None:
    smtp = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": PASSWORD}
    )
    graph = vault.create_config(
        "t_a",
        type="microsoft_graph",
        name="Graph",
        config=GRAPH,
        credentials={"client_secret": "s"},
    )
    vault.store_oauth_token("t_a", graph.id, **GRAPH_TOKEN)
    for warm in (False, True):  # the full path, then the hot path (key cached)
        if not warm:
            vault.keyring.cache.clear()
        opened = vault.open_config("t_a", smtp.id)
        assert isinstance(opened, OpenedConfig)
        assert (opened.config.id, opened.config.config.host) == (smtp.id, "smtp.example.com")  # type: ignore[union-attr]
        assert _secret(opened.credentials.password) == PASSWORD  # type: ignore[union-attr]
        assert opened.token is None
        both = vault.open_config("t_a", graph.id)
        assert both.config.version == graph.version
        assert _secret(both.credentials.client_secret) == "s"  # type: ignore[union-attr]
        assert both.token is not None
        assert _secret(both.token.access_token) == GRAPH_TOKEN["access_token"]
        assert both.token.expires_at == GRAPH_TOKEN["expires_at"]
    assert PASSWORD not in repr(opened)
    with pytest.raises(TypeError):
        pickle.dumps(opened)
    vault.delete_config("t_a", smtp.id)
    with pytest.raises(NotFoundError):
        vault.open_config("t_a", smtp.id)


def test_a_writer_flipping_the_host_never_gets_the_password_beside_the_hostile_host(
    sync_vault: Vault, app_url: str
) -> None:
    """The race the review won 612 times in 2,073 with get_config + load_credentials."""
    cfg = sync_vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": PASSWORD}
    )
    stop = threading.Event()
    failed: list[BaseException] = []

    def flip() -> None:
        # No prepared statements: behind PgBouncer in transaction mode (its lane) the
        # next transaction may run on another server connection that never saw them.
        try:
            with psycopg.connect(app_url, autocommit=False, prepare_threshold=None) as connection:
                flip_on(connection)
        except BaseException as exc:  # the test fails with it, not a thread warning
            failed.append(exc)

    def flip_on(connection: psycopg.Connection[Any]) -> None:
        while not stop.is_set():
            for host in ("smtp.attacker.example", "smtp.example.com"):
                connection.execute("SELECT set_config('tenantvault.tenant_id', 't_a', true)")
                connection.execute(
                    "UPDATE dripiq_app.email_provider_configs "
                    "SET config = config || jsonb_build_object('host', %(h)s::text) "
                    "WHERE id = %(id)s",
                    {"h": host, "id": cfg.id},
                )
                connection.commit()

    writer = threading.Thread(target=flip)
    writer.start()
    served, refused = [], 0
    try:
        for _ in range(600):
            try:
                opened = sync_vault.open_config("t_a", cfg.id)
            except DecryptionError:
                refused += 1
                continue
            served.append(opened.config.config.host)  # type: ignore[union-attr]
    finally:
        stop.set()
        writer.join()
    print(f"served {len(served)}, refused {refused}")
    assert failed == [], "the writer stopped"
    assert served, "the real config never opened"
    assert refused, "the writer never got a hostile host in"
    assert set(served) == {"smtp.example.com"}


@pytest.mark.parametrize(
    ("kind", "config", "change"),
    [
        ("smtp", OAUTH_SMTP, HOSTILE),
        (
            "microsoft_graph",
            GRAPH,
            'config = config || \'{"azure_tenant_id": "attacker.onmicrosoft.com"}\'',
        ),
        (
            "microsoft_graph",
            GRAPH,
            'config = config || \'{"authority_url": "https://login.attacker.example/"}\'',
        ),
        ("microsoft_graph", GRAPH, "type = 'google_workspace'"),
    ],
    ids=["smtp-oauth2-host", "graph-tenant", "graph-authority", "retyped"],
)
def test_a_token_is_never_served_beside_a_rewritten_config(
    vault: Vault, app_url: str, kind: str, config: dict[str, Any], change: str
) -> None:
    cfg = vault.create_config("t_a", type=kind, name="OAuth", config=config)
    vault.store_oauth_token("t_a", cfg.id, **GRAPH_TOKEN)
    assert _secret(vault.load_oauth_token("t_a", cfg.id).access_token) == "access-one"
    _rewrite(app_url, cfg.id, change)
    for path in ("hot", "full"):
        if path == "full":
            vault.keyring.cache.clear()
        with pytest.raises(DecryptionError):
            vault.load_oauth_token("t_a", cfg.id)
        with pytest.raises(DecryptionError):
            vault.open_config("t_a", cfg.id)


def test_a_retyped_config_does_not_open_its_credentials(vault: Vault, app_url: str) -> None:
    cfg = vault.create_config(
        "t_a",
        type="microsoft_graph",
        name="Graph",
        config=GRAPH,
        credentials={"client_secret": "graph-secret"},
    )
    assert _secret(vault.load_credentials("t_a", cfg.id).client_secret) == "graph-secret"  # type: ignore[union-attr]
    _rewrite(app_url, cfg.id, "type = 'google_workspace'")
    for path in ("hot", "full"):
        if path == "full":
            vault.keyring.cache.clear()
        with pytest.raises(DecryptionError):
            vault.load_credentials("t_a", cfg.id)
        with pytest.raises(DecryptionError):
            vault.open_config("t_a", cfg.id)


def test_a_config_change_reseals_its_tokens_in_the_same_transaction(vault: Vault) -> None:
    cfg = vault.create_config("t_a", type="microsoft_graph", name="Graph", config=GRAPH)
    vault.store_oauth_token("t_a", cfg.id, **GRAPH_TOKEN)
    vault.update_config("t_a", cfg.id, config={**GRAPH, "azure_tenant_id": "fabrikam.com"})
    opened = vault.open_config("t_a", cfg.id)
    assert opened.config.config.azure_tenant_id == "fabrikam.com"  # type: ignore[union-attr]
    assert opened.token is not None
    assert _secret(opened.token.refresh_token) == "refresh-one"
    vault.rollback_config("t_a", cfg.id, 1)
    assert _secret(vault.load_oauth_token("t_a", cfg.id).access_token) == "access-one"
    # A rename or a credential rotation leaves the config's content, and the tokens, alone.
    vault.update_config("t_a", cfg.id, name="Graph 2")
    assert _secret(vault.load_oauth_token("t_a", cfg.id).access_token) == "access-one"


def test_a_config_change_stops_when_its_tokens_do_not_open_beside_it(
    vault: Vault, app_url: str
) -> None:
    """A token stored for another config is not laundered into the new one's binding."""
    cfg = vault.create_config("t_a", type="smtp", name="OAuth", config=OAUTH_SMTP)
    vault.store_oauth_token("t_a", cfg.id, **GRAPH_TOKEN)
    _rewrite(app_url, cfg.id, HOSTILE)
    with pytest.raises(DecryptionError):
        vault.update_config("t_a", cfg.id, config={**OAUTH_SMTP, "port": 2525})


def test_tokens_of_a_soft_deleted_config_do_not_load(vault: Vault) -> None:
    cfg = vault.create_config("t_a", type="microsoft_graph", name="Graph", config=GRAPH)
    vault.store_oauth_token("t_a", cfg.id, **GRAPH_TOKEN)
    vault.load_oauth_token("t_a", cfg.id)  # the key is cached: the hot path
    vault.delete_config("t_a", cfg.id)
    with pytest.raises(NotFoundError):
        vault.load_oauth_token("t_a", cfg.id)
    vault.keyring.cache.clear()
    with pytest.raises(NotFoundError):
        vault.load_oauth_token("t_a", cfg.id)
    vault.restore_config("t_a", cfg.id)
    assert _secret(vault.load_oauth_token("t_a", cfg.id).access_token) == "access-one"


# --- tokens stored in format 2 (bound to their row only) move to format 3 online ---


def _seal_format_2(key: Any, plaintext: bytes, column: str, row: str, binding: bytes) -> str:
    """A format-2 value as the previous release wrote it (built here from the layout)."""
    header = f"tv2.{key.version}."
    parts = [b"tenantvault.sealed.v2", header.encode(), b"t_a"]
    parts += [f"email_provider_tokens.{column}".encode(), row.encode(), binding]
    aad = b"".join(struct.pack(">I", len(p)) + p for p in parts)
    nonce = os.urandom(12)
    body = AESGCM(key.material()).encrypt(nonce, plaintext, aad)
    return header + base64.urlsafe_b64encode(nonce + body).decode().rstrip("=")


def test_format_2_tokens_open_are_counted_and_move_to_the_config_binding_by_reseal(
    vault: Vault, owner_engine: sa.Engine, operator_db: Any, provider: CountingProvider
) -> None:
    cfg = vault.create_config("t_a", type="microsoft_graph", name="Graph", config=GRAPH)
    vault.store_oauth_token("t_a", cfg.id, **GRAPH_TOKEN)
    with tenant_session(vault.engine, "t_a") as session:
        key = fresh_keyring(sync_provider(vault))._active_key(session.connection(), "t_a")
    with owner_engine.begin() as connection:
        row_id, version = connection.execute(
            sa.text("SELECT id, version FROM dripiq_app.email_provider_tokens")
        ).one()
        binding = f"token:{row_id}:{version}".encode()
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.email_provider_tokens SET encrypted_access_token = :a, "
                "encrypted_refresh_token = :r"
            ),
            {
                "a": _seal_format_2(key, b"access-v2", "encrypted_access_token", cfg.id, binding),
                "r": _seal_format_2(key, b"refresh-v2", "encrypted_refresh_token", cfg.id, binding),
            },
        )
    # Not recorded by the upgrade (written after it): refused, on both paths.
    with pytest.raises(DecryptionError):
        vault.load_oauth_token("t_a", cfg.id)
    vault.keyring.cache.clear()
    with pytest.raises(DecryptionError):
        vault.load_oauth_token("t_a", cfg.id)
    record_as_the_upgrade(owner_engine, "t_a")  # as if they were there at the upgrade
    assert _secret(vault.load_oauth_token("t_a", cfg.id).access_token) == "access-v2"
    assert key_status(operator_db, provider, ["t_a"]).legacy_values == 2
    report = rotate_data_keys(
        operator_db, fresh_keyring(provider), ["t_a"], DekRotationOptions(new_key=False)
    )
    assert report.ok, report
    assert key_status(operator_db, provider, ["t_a"]).legacy_values == 0
    with owner_engine.connect() as connection:
        values = connection.execute(
            sa.text(
                "SELECT encrypted_access_token, encrypted_refresh_token "
                "FROM dripiq_app.email_provider_tokens"
            )
        ).one()
    assert all(value.startswith("tv3.") for value in values)
    vault.keyring.cache.clear()
    token = vault.open_config("t_a", cfg.id).token
    assert token is not None
    assert (_secret(token.access_token), _secret(token.refresh_token)) == (
        "access-v2",
        "refresh-v2",
    )
