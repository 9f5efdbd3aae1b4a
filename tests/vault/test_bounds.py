"""Input bounds (issue 21, item 9; issue 22, item 4): every config field and every
secret is bounded, numbers and flags are strict, and a config that needs credentials
has them. Each refusal names the field, never the value, and writes nothing. The hot
path's cache of config bindings stays within its byte bound however large the configs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import InvalidInputError, Vault
from tenantvault.keys.sealed import BINDING_CACHE_MAX_BYTES, binding_cache
from tenantvault.vault import providers
from tenantvault.vault.providers import SCOPES_MAX_ITEMS, SECRET_MAX_BYTES

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}
GRAPH = {
    "azure_tenant_id": "contoso.onmicrosoft.com",
    "client_id": "0f0e0d0c-0b0a-4908-8706-050403020100",
    "scopes": ["https://graph.microsoft.com/Mail.Send"],
    "auth_type": "delegated",
}
GOOGLE = {"auth_type": "oauth2", "project_id": "acme-mail", "scopes": ["openid"], "client_id": "c"}
MARK = "Q7v"  # what every oversized value is made of: it must never come back in a message
TOO_LONG = MARK * (SECRET_MAX_BYTES // len(MARK) + 1)
TEN_MB = MARK * (10_000_000 // len(MARK))
PEM = "-----BEGIN PRIVATE KEY-----\n" + "QUJD\n" * 4000 + "-----END PRIVATE KEY-----\n"


def _scopes(count: int, length: int = 500) -> list[str]:
    return [f"https://graph.microsoft.com/{n:04d}{'x' * (length - 32)}" for n in range(count)]


CREATE_REFUSED = [
    ("smtp", {**SMTP, "port": True}, {"password": "p"}, "config.port"),
    ("smtp", {**SMTP, "port": "587"}, {"password": "p"}, "config.port"),
    ("smtp", {**SMTP, "port": 587.0}, {"password": "p"}, "config.port"),
    ("smtp", {**SMTP, "secure": 0}, {"password": "p"}, "config.secure"),
    ("smtp", {**SMTP, "secure": "false"}, {"password": "p"}, "config.secure"),
    ("smtp", {**SMTP, "tls": {"reject_unauthorized": 1}}, {"password": "p"}, "config.tls"),
    ("smtp", {**SMTP, "user": MARK * 400}, {"password": "p"}, "config.user"),
    ("smtp", {**SMTP, "host": "a." * 200 + "com"}, {"password": "p"}, "config.host"),
    ("smtp", SMTP, {"password": ""}, "credentials.password"),
    ("smtp", SMTP, None, "credentials.password: required for auth_type login"),
    ("smtp", SMTP, {"password": TOO_LONG}, "credentials.password"),
    ("smtp", SMTP, {"password": TEN_MB}, "credentials.password"),
    ("sendgrid", {"legacy": 1}, None, "config.legacy"),
    ("sendgrid", {}, {"api_key": "SG.abcdefgh." + TOO_LONG}, "credentials.api_key"),
    ("microsoft_graph", {**GRAPH, "scopes": _scopes(SCOPES_MAX_ITEMS + 1)}, None, "config.scopes"),
    ("microsoft_graph", {**GRAPH, "scopes": _scopes(4000)}, None, "config.scopes"),  # 1.9 MB
    ("microsoft_graph", {**GRAPH, "scopes": _scopes(1, 600)}, None, "config.scopes.0"),
    ("microsoft_graph", GRAPH, {"client_secret": ""}, "credentials.client_secret"),
    ("microsoft_graph", GRAPH, {"client_secret": TOO_LONG}, "credentials.client_secret"),
    ("google_workspace", GOOGLE, {"client_secret": ""}, "credentials.client_secret"),
    ("google_workspace", GOOGLE, {"client_secret": TOO_LONG}, "credentials.client_secret"),
    (
        "google_workspace",
        GOOGLE,
        {"client_secret": "s", "private_key": PEM},
        "credentials.private_key",
    ),
]


def _config_rows(owner_engine: sa.Engine) -> int:
    with owner_engine.connect() as connection:
        return int(
            connection.execute(
                sa.text("SELECT count(*) FROM dripiq_app.email_provider_configs")
            ).scalar_one()
        )


def _refused(call: Any, field: str) -> str:
    with pytest.raises(InvalidInputError) as caught:
        call()
    message = str(caught.value)
    assert field in message
    assert MARK not in message  # named, never echoed
    assert len(message) < 300
    return message


@pytest.mark.parametrize(
    ("kind", "config", "credentials", "field"),
    CREATE_REFUSED,
    ids=[f"{c[0]}-{c[3]}-{n}" for n, c in enumerate(CREATE_REFUSED)],
)
def test_create_refuses_out_of_bounds_input_naming_the_field(
    vault: Any, owner_engine: sa.Engine, kind: str, config: Any, credentials: Any, field: str
) -> None:
    _refused(
        lambda: vault.create_config(
            "t_a", type=kind, name="N", config=config, credentials=credentials
        ),
        field,
    )
    assert _config_rows(owner_engine) == 0


def test_every_bound_may_be_reached(vault: Any) -> None:
    """At the limits, everything is accepted (and opens back whole)."""
    at_limit = "é" * (SECRET_MAX_BYTES // 2)  # two bytes each: exactly the limit
    smtp = vault.create_config(
        "t_a", type="smtp", name="S", config=SMTP, credentials={"password": at_limit}
    )
    assert vault.load_credentials("t_a", smtp.id).password.get_secret_value() == at_limit
    graph = vault.create_config(
        "t_a",
        type="microsoft_graph",
        name="G",
        config={**GRAPH, "scopes": _scopes(SCOPES_MAX_ITEMS, 512)},
        credentials={"client_secret": "x" * SECRET_MAX_BYTES},
    )
    assert len(vault.get_config("t_a", graph.id).config.scopes) == SCOPES_MAX_ITEMS


def test_updates_and_stores_are_bounded_too(vault: Any, owner_engine: sa.Engine) -> None:
    smtp = vault.create_config(
        "t_a", type="smtp", name="S", config=SMTP, credentials={"password": "p"}
    )
    oauth = vault.create_config(
        "t_a", type="smtp", name="O", config={**SMTP, "auth_type": "oauth2"}
    )
    _refused(lambda: vault.store_credentials("t_a", smtp.id, {"password": TEN_MB}), "password")
    _refused(lambda: vault.store_credentials("t_a", smtp.id, {"password": ""}), "password")
    _refused(lambda: vault.update_config("t_a", smtp.id, config={**SMTP, "port": True}), "port")
    _refused(
        lambda: vault.update_config("t_a", oauth.id, config=SMTP),  # login, no password
        "credentials.password: required",
    )
    soon = datetime.now(UTC) + timedelta(hours=1)
    for kwargs, field in [
        ({"access_token": TOO_LONG}, "access_token"),
        ({"access_token": TEN_MB}, "access_token"),
        ({"access_token": "a", "refresh_token": TOO_LONG}, "refresh_token"),
        ({"access_token": "a", "token_type": MARK * 30}, "token_type"),
        ({"access_token": "a", "scopes": ["s"] * (SCOPES_MAX_ITEMS + 1)}, "scopes"),
        ({"access_token": "a", "scopes": [MARK * 200]}, "scopes"),
    ]:
        _refused(
            lambda given=kwargs: vault.store_oauth_token("t_a", oauth.id, expires_at=soon, **given),
            field,
        )
    assert vault.get_config("t_a", smtp.id).version == 1  # nothing was written
    assert vault.get_config("t_a", oauth.id).version == 1
    assert vault.list_config_versions("t_a", smtp.id)[-1].version == 1


def test_the_whole_config_is_bounded(vault: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each field's bound keeps every config's JSON under 64 KiB today; the whole is
    # bounded as well, in case a field is added: shown with a lower bound.
    monkeypatch.setattr(providers, "CONFIG_MAX_BYTES", 1024)
    _refused(
        lambda: vault.create_config(
            "t_a", type="microsoft_graph", name="G", config={**GRAPH, "scopes": _scopes(3)}
        ),
        "config: must be at most 1024 bytes",
    )


def test_the_binding_cache_stays_within_its_bytes_over_many_large_config_versions(
    sync_vault: Vault,
) -> None:
    cache = binding_cache()
    cache.clear()
    scopes = _scopes(SCOPES_MAX_ITEMS, 512)  # about 33 KB of config: the largest allowed
    cfg = sync_vault.create_config(
        "t_a",
        type="microsoft_graph",
        name="G",
        config={**GRAPH, "scopes": scopes},
        credentials={"client_secret": "cs"},
    )
    versions = 1 + BINDING_CACHE_MAX_BYTES // 30_000  # more than the bound holds
    for n in range(versions):
        if n:
            scopes = [f"{scopes[0][:-6]}{n:06d}", *scopes[1:]]
            sync_vault.update_config("t_a", cfg.id, config={**GRAPH, "scopes": scopes})
        creds: Any = sync_vault.load_credentials("t_a", cfg.id)  # the hot path: cached binding
        assert creds.client_secret.get_secret_value() == "cs"
        assert cache.size <= BINDING_CACHE_MAX_BYTES
    assert 0 < len(cache) < versions  # the oldest versions went
    # What it charges covers at least the config texts it holds.
    assert cache.size >= len(cache) * 30_000
