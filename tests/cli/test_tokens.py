"""``tenantvault tokens`` through a real process, against the OAuth provider on
loopback: the keep-alive refreshes what is due, reports a revoked grant (exit 4) and
never prints a token; ``status`` lists what needs re-consent."""

from __future__ import annotations

import json

from tenantvault import Vault
from tenantvault.settings import Settings
from tests.cli.process import run_cli
from tests.conftest import OAuthProvider, Services
from tests.vault.test_oauth import connect, graph_config


def _env(settings: Settings, services: Services) -> dict[str, str]:
    return {
        "TENANTVAULT_DATABASE_URL": settings.database_url.get_secret_value(),
        "VAULT_ADDR": services.vault_addr,
        "VAULT_TOKEN": services.vault_token,
        "TENANTVAULT_TRANSIT_KEY": "tenantvault-tests",
    }


def _lines(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_the_job_refreshes_what_is_due_and_exits_4_on_a_revoked_grant(
    vault: Vault, migrated: Settings, services: Services, oauth_provider: OAuthProvider
) -> None:
    kept = graph_config(vault, oauth_provider, name="Kept")
    revoked = graph_config(vault, oauth_provider, tenant="t_b", name="Revoked")
    granted = connect(vault, kept, "frank@example.com")
    connect(vault, revoked, "grace@example.com", tenant="t_b")
    oauth_provider.revoke("grace@example.com")
    env = _env(migrated, services)

    # The provider's tokens live an hour: not due within 15 minutes, due within two hours.
    quiet = run_cli("tokens", "refresh", "--json", **env)
    assert quiet.returncode == 0, quiet.stderr
    assert _lines(quiet.stdout)[-1]["refreshed"] == 0

    dry = run_cli("tokens", "refresh", "--expiring-within", "7200", "--dry-run", **env)
    assert dry.returncode == 0, dry.stderr
    assert "summary: 0 refreshed, 0 reconsent required, 0 failed, 2 would refresh" in dry.stdout

    ran = run_cli("tokens", "refresh", "--expiring-within", "7200", "--json", **env)
    assert ran.returncode == 4, ran.stderr
    lines = _lines(ran.stdout)
    outcomes = {(x["tenant_id"], x["config_id"]): x["outcome"] for x in lines[:-1]}
    assert outcomes == {("t_a", kept): "refreshed", ("t_b", revoked): "reconsent_required"}
    assert lines[-1] == {
        "event": "summary", "dry_run": False, "refreshed": 1,
        "reconsent_required": 1, "failed": 0, "would_refresh": 0,
    }  # fmt: skip
    token = vault.load_oauth_token("t_a", kept)
    assert token.version == granted.version + 1
    assert token.access_token is not None
    assert token.refresh_token is not None
    for secret in (token.access_token, token.refresh_token):
        assert secret.get_secret_value() not in ran.stdout + ran.stderr

    status = run_cli("tokens", "status", "--json", **env)
    assert status.returncode == 4, status.stderr
    listed = _lines(status.stdout)
    assert [(x["state"], x["config_id"]) for x in listed[:-1]] == [("reconsent_required", revoked)]

    only_a = run_cli("tokens", "refresh", "--idle-days", "1", "--tenant", "t_a", **env)
    assert only_a.returncode == 0, only_a.stderr  # nothing idle that long; t_b not looked at
    assert "summary: 0 refreshed, 0 reconsent required" in only_a.stdout
