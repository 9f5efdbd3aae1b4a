"""What the commands say when transit does not serve them: the token refused, a
request this token may not make, a host that does not resolve; each in one line that
says what happened, and ``status`` never gives two reasons that contradict each other."""

from __future__ import annotations

import re
from typing import Any

import hvac
import pytest

from tenantvault import cli
from tenantvault.settings import Settings
from tests.cli.process import failed_line, run_cli
from tests.conftest import Services

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}
REFUSED = "the token was refused (not a valid token: mistyped, expired or revoked)"
NOWHERE = "https://no-such-host.invalid:8200"


def _env(settings: Settings, services: Services, **override: str) -> dict[str, str]:
    return {
        "TENANTVAULT_DATABASE_URL": settings.database_url.get_secret_value(),
        "VAULT_ADDR": services.vault_addr,
        "VAULT_TOKEN": services.vault_token,
        "TENANTVAULT_TRANSIT_KEY": "tenantvault-tests",
        "TENANTVAULT_VAULT_TIMEOUT_SECONDS": "1",
        **override,
    }


@pytest.mark.parametrize("token", ["not-a-valid-token", ""])
def test_a_bad_or_empty_token_is_said_to_be_refused(
    token: str, vault: Any, migrated: Settings, services: Services
) -> None:
    vault.create_config("t_a", type="smtp", name="R", config=SMTP, credentials={"password": "p"})
    result = run_cli("rotate-keys", "status", **_env(migrated, services, VAULT_TOKEN=token))
    line = failed_line(result, cli.EXIT_FAILED)
    assert line == (
        f"FAILED: could not read the transit key: transit at {services.vault_addr.rstrip('/')}: "
        f"{REFUSED}"
    )
    assert "may not" not in line

    status = run_cli("status", **_env(migrated, services, VAULT_TOKEN=token))
    assert status.returncode == cli.EXIT_UNHEALTHY
    assert re.search(rf"^transit +http\S+: {re.escape(REFUSED)}$", status.stdout, re.M)
    # The data keys' line gives the same reason, not a second one ("not reachable").
    assert re.search(
        rf"^data keys +wrapped under KEK v1\.\.v1; transit key not checked: {re.escape(REFUSED)}$",
        status.stdout,
        re.M,
    ), status.stdout
    assert "reachable" not in status.stdout


def test_a_valid_token_without_the_permission_is_told_what_it_may_not_do(
    vault: Any, migrated: Settings, services: Services
) -> None:
    vault.create_config("t_a", type="smtp", name="R", config=SMTP, credentials={"password": "p"})
    root = hvac.Client(url=services.vault_addr, token=services.vault_token)
    root.sys.create_or_update_policy(
        name="messages-mounts-only", policy='path "sys/mounts" { capabilities = ["read"] }'
    )
    token = root.auth.token.create(policies=["messages-mounts-only"], ttl="10m")
    environment = _env(migrated, services, VAULT_TOKEN=token["auth"]["client_token"])
    line = failed_line(run_cli("rotate-keys", "status", **environment), cli.EXIT_FAILED)
    assert line == (
        "FAILED: the transit token may not generate a data key with transit key "
        "transit/tenantvault-tests"
    )


def test_a_host_that_does_not_resolve_is_named(migrated: Settings, services: Services) -> None:
    environment = _env(migrated, services, VAULT_ADDR=NOWHERE)
    line = failed_line(run_cli("rotate-keys", "status", **environment), cli.EXIT_FAILED)
    assert line == (
        f"FAILED: could not read the transit key: transit at {NOWHERE} cannot be found: "
        "the host name no-such-host.invalid does not resolve"
    )
    status = run_cli("status", **environment)
    assert status.returncode == cli.EXIT_UNHEALTHY
    assert re.search(
        r"^transit +https://no-such-host\.invalid:8200/: not found: the host name "
        r"no-such-host\.invalid does not resolve$",
        status.stdout,
        re.M,
    ), status.stdout
