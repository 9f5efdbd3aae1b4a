"""The OAuth lifecycle against a real OAuth 2 provider over HTTP on loopback
(oidc-provider-mock, tests/conftest.py): consent with PKCE, the code exchange,
managed refresh with rotation, a revoked grant as a state, transient failures, and
a config whose token endpoint was rewritten outside tenantvault getting nothing."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tenantvault import (
    AuthorizationRequest,
    DecryptionError,
    InvalidInputError,
    OAuthProviderUnavailable,
    ReconsentRequired,
    TokenEvent,
    Vault,
)
from tenantvault.metrics import Metrics
from tenantvault.settings import Settings
from tests.async_support import sync_looking_async_vault
from tests.conftest import OAuthProvider, Services, child_environment
from tests.test_metrics import readings
from tests.vault.test_tokens import refresh_in_children

REDIRECT = "http://127.0.0.1:8765/oauth/callback"
GRAPH_DELEGATED = {
    "azure_tenant_id": "contoso.onmicrosoft.com",
    "client_id": "0f0e0d0c-0b0a-4908-8706-050403020100",
    "scopes": ["openid", "email"],
    "auth_type": "delegated",
}
LATER = timedelta(hours=2)  # past the provider's one-hour access tokens: a refresh is due


def graph_config(
    vault: Any, provider: OAuthProvider, tenant: str = "t_a", name: str = "Mail", **extra: Any
) -> str:
    config = {
        **GRAPH_DELEGATED,
        "token_url": provider.token_url,
        "authorize_url": provider.authorize_url,
        **extra,
    }
    made = vault.create_config(
        tenant, type="microsoft_graph", name=name, config=config,
        credentials={"client_secret": "client-secret"},
    )  # fmt: skip
    return str(made.id)


def consent(request: AuthorizationRequest, user: str) -> tuple[str, str]:
    """The user consents at the provider: the code and state its redirect carries."""
    answer = requests.post(request.url, data={"sub": user}, allow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    query = parse_qs(urlsplit(answer.headers["Location"]).query)
    return query["code"][0], query["state"][0]


def connect(vault: Any, config_id: str, user: str, tenant: str = "t_a") -> Any:
    request = vault.authorization_url(tenant, config_id, redirect_uri=REDIRECT)
    code, state = consent(request, user)
    return vault.complete_authorization(
        tenant, config_id, code=code, state=state, redirect_uri=REDIRECT
    )


class Listener:
    """A loopback HTTP server that counts the requests it gets and answers ``status``."""

    def __init__(self, status: int) -> None:
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                listener.requests += 1
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"unavailable")

            def log_message(self, *args: object) -> None:
                pass

        self.requests = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    built = Listener(503)
    yield built
    built.close()


def test_the_authorization_code_flow_stores_a_refreshable_token(
    vault: Any, oauth_provider: OAuthProvider
) -> None:
    config_id = graph_config(vault, oauth_provider)
    request = vault.authorization_url("t_a", config_id, redirect_uri=REDIRECT)
    query = parse_qs(urlsplit(request.url).query)
    assert request.url.startswith(oauth_provider.authorize_url + "?")
    assert query["code_challenge_method"] == ["S256"]
    assert query["code_challenge"]
    assert query["state"] == [request.state]
    assert query["redirect_uri"] == [REDIRECT]
    assert "offline_access" in query["scope"][0].split()
    code, state = consent(request, "alice@example.com")

    token = vault.complete_authorization(
        "t_a", config_id, code=code, state=state, redirect_uri=REDIRECT
    )

    assert token.access_token is not None
    assert token.refresh_token is not None
    assert token.expires_at is not None
    assert token.expires_at > datetime.now(UTC)
    assert vault.load_oauth_token("t_a", config_id) == token
    assert vault.open_config("t_a", config_id).token == token


def test_a_replayed_foreign_altered_or_misdirected_state_is_refused(
    vault: Any, oauth_provider: OAuthProvider
) -> None:
    first = graph_config(vault, oauth_provider)
    second = graph_config(vault, oauth_provider, name="Other")
    request = vault.authorization_url("t_a", first, redirect_uri=REDIRECT)
    code, state = consent(request, "bob@example.com")
    altered = state[:-2] + ("A" if state[-2] != "A" else "B") + state[-1]
    refused = [
        ("t_a", second, state, REDIRECT),  # another config's state
        ("t_a", first, altered, REDIRECT),
        ("t_a", first, state, "http://127.0.0.1:8765/elsewhere"),
    ]
    for tenant, config_id, given, redirect in refused:
        with pytest.raises(InvalidInputError, match=r"^state: "):
            vault.complete_authorization(
                tenant, config_id, code=code, state=given, redirect_uri=redirect
            )
    vault.complete_authorization("t_a", first, code=code, state=state, redirect_uri=REDIRECT)
    with pytest.raises(InvalidInputError, match=r"^state: "):  # the same state again
        vault.complete_authorization("t_a", first, code=code, state=state, redirect_uri=REDIRECT)
    stale = vault.authorization_url("t_a", first, redirect_uri=REDIRECT)
    code, state = consent(stale, "bob@example.com")
    with pytest.raises(InvalidInputError, match=r"^state: "):  # issued too long ago
        vault.complete_authorization(
            "t_a", first, code=code, state=state, redirect_uri=REDIRECT,
            now=datetime.now(UTC) + timedelta(hours=1),
        )  # fmt: skip


def test_managed_refresh_stores_the_rotated_refresh_token(
    vault: Any, oauth_provider: OAuthProvider
) -> None:
    config_id = graph_config(vault, oauth_provider)
    granted = connect(vault, config_id, "carol@example.com")

    refreshed = vault.refresh_oauth_token("t_a", config_id, min_validity=LATER)

    assert refreshed.version == granted.version + 1
    assert refreshed.access_token != granted.access_token
    assert refreshed.refresh_token is not None
    assert refreshed.refresh_token != granted.refresh_token  # rotated, and stored
    assert vault.load_oauth_token("t_a", config_id) == refreshed
    again = vault.refresh_oauth_token("t_a", config_id, min_validity=LATER)  # the new one works
    assert again.version == refreshed.version + 1
    # A fresh token is returned as it is: no request.
    assert vault.refresh_oauth_token("t_a", config_id) == again


def test_a_revoked_grant_is_marked_audited_announced_and_not_retried(
    sync_vault: Vault, oauth_provider: OAuthProvider, owner_engine: sa.Engine
) -> None:
    reader = InMemoryMetricReader()
    events: list[TokenEvent] = []
    vault = Vault(
        sync_vault.engine,
        sync_vault.keyring,
        metrics=Metrics(MeterProvider([reader])),
        on_token_event=events.append,
    )
    config_id = graph_config(vault, oauth_provider)
    connect(vault, config_id, "dave@example.com")
    oauth_provider.revoke("dave@example.com")

    for _ in range(2):
        with pytest.raises(ReconsentRequired) as raised:
            vault.refresh_oauth_token("t_a", config_id, min_validity=LATER)
        assert (raised.value.tenant_id, raised.value.config_id) == ("t_a", config_id)

    counted = readings(reader)
    # One request was sent: the second call found the mark and sent none.
    assert counted[("tenantvault.oauth.refreshes", (("outcome", "reconsent_required"),))] == 1
    assert counted[("tenantvault.oauth.events", (("outcome", "reconsent_required"),))] == 1
    assert events == [TokenEvent("t_a", config_id, "reconsent_required", "invalid_grant")]
    with owner_engine.connect() as connection:
        marked = connection.execute(
            sa.text("SELECT reconsent_required_at FROM dripiq_app.email_provider_tokens "
                    "WHERE config_id = :c"), {"c": config_id},
        ).scalar_one()  # fmt: skip
        actions = connection.execute(
            sa.text("SELECT action FROM dripiq_app.audit_events WHERE target_id = :c "
                    "ORDER BY seq"), {"c": config_id},
        ).scalars().all()  # fmt: skip
    assert marked is not None
    assert actions[-1] == "token.reconsent_required"

    connect(vault, config_id, "dave@example.com")  # the user consents again
    assert events[-1] == TokenEvent("t_a", config_id, "recovered")
    refreshed = vault.refresh_oauth_token("t_a", config_id, min_validity=LATER)
    assert refreshed.access_token is not None
    vault.dispose()


def test_a_rewritten_token_url_gets_nothing_and_no_request_leaves(
    sync_vault: Vault,
    oauth_provider: OAuthProvider,
    owner_engine: sa.Engine,
    listener: Listener,
) -> None:
    config_id = graph_config(sync_vault, oauth_provider)
    connect(sync_vault, config_id, "erin@example.com")
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE dripiq_app.email_provider_configs "
                    "SET config = jsonb_set(config, '{token_url}', to_jsonb(CAST(:u AS text))) "
                    "WHERE id = :c"), {"u": listener.url, "c": config_id},
        )  # fmt: skip

    with pytest.raises(DecryptionError):
        sync_vault.refresh_oauth_token("t_a", config_id, min_validity=LATER)
    with pytest.raises(DecryptionError):
        sync_vault.authorization_url("t_a", config_id, redirect_uri=REDIRECT)
    assert listener.requests == 0


def test_a_failing_token_endpoint_is_retried_and_marks_nothing(
    sync_vault: Vault, oauth_provider: OAuthProvider, listener: Listener
) -> None:
    config_id = graph_config(sync_vault, oauth_provider, token_url=listener.url)
    sync_vault.store_oauth_token(
        "t_a", config_id, access_token="access", refresh_token="refresh",
        expires_at=datetime.now(UTC) + timedelta(minutes=1),
    )  # fmt: skip

    with pytest.raises(OAuthProviderUnavailable):
        sync_vault.refresh_oauth_token("t_a", config_id)

    assert listener.requests == 3
    kept = sync_vault.load_oauth_token("t_a", config_id)
    assert kept.version == 1
    assert kept.refresh_token is not None
    assert kept.refresh_token.get_secret_value() == "refresh"


def test_an_endpoint_must_be_https_but_on_loopback(sync_vault: Vault) -> None:
    for url in ("http://login.example.com/token", "ftp://127.0.0.1/token"):
        with pytest.raises(InvalidInputError, match=r"config\.token_url"):
            sync_vault.create_config(
                "t_a", type="microsoft_graph", name="M",
                config={**GRAPH_DELEGATED, "token_url": url},
                credentials={"client_secret": "s"},
            )  # fmt: skip


def test_concurrent_managed_refreshes_in_several_processes_send_one_request(
    sync_vault: Vault,
    oauth_provider: OAuthProvider,
    app_settings: Settings,
    services: Services,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config_id = graph_config(sync_vault, oauth_provider)
    granted = connect(sync_vault, config_id, "heidi@example.com")
    assert granted.access_token is not None
    assert granted.refresh_token is not None
    version = sync_vault.store_oauth_token(  # the grant, a minute from its expiry
        "t_a", config_id,
        access_token=granted.access_token.get_secret_value(),
        refresh_token=granted.refresh_token.get_secret_value(),
        expires_at=datetime.now(UTC) + timedelta(minutes=1),
    )  # fmt: skip
    before: list[int] = []
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        results = refresh_in_children(
            child_environment(app_settings, services),
            config_id,
            tmp_path,
            "managed",
            started=lambda: before.append(len(caplog.records)),  # after the grant's exchange
        )
    stored = sync_vault.load_oauth_token("t_a", config_id)
    assert stored.access_token is not None
    assert len(results) == 12
    assert {tuple(r) for r in results} == {
        (stored.access_token.get_secret_value(), str(version + 1))
    }
    requests_sent = [
        r for r in caplog.records[before[0] :] if "POST /oauth2/token" in r.getMessage()
    ]
    assert len(requests_sent) == 1


def test_async_vault_awaits_a_coroutine_hook_for_a_revoked_grant(
    app_settings: Settings, provider: Any, oauth_provider: OAuthProvider
) -> None:
    heard: list[TokenEvent] = []

    async def on_token_event(event: TokenEvent) -> None:
        await asyncio.sleep(0)  # a real await: the hook runs on the loop
        heard.append(event)

    with sync_looking_async_vault(app_settings, provider, on_token_event=on_token_event) as vault:
        config_id = graph_config(vault, oauth_provider)
        connect(vault, config_id, "ivan@example.com")
        oauth_provider.revoke("ivan@example.com")
        with pytest.raises(ReconsentRequired):
            vault.refresh_oauth_token("t_a", config_id, min_validity=LATER)
        connect(vault, config_id, "ivan@example.com")
        assert vault.refresh_oauth_token("t_a", config_id, min_validity=LATER).version == 3

    assert [e.outcome for e in heard] == ["reconsent_required", "recovered"]


def test_vault_refuses_a_coroutine_hook_it_could_not_await(sync_vault: Vault) -> None:
    async def on_token_event(event: TokenEvent) -> None:
        pass

    with pytest.raises(TypeError, match="on_token_event"):
        Vault(sync_vault.engine, sync_vault.keyring, on_token_event=on_token_event)
