"""README.md's Python runs as written: every ```python block as its own program (a fresh
namespace each, so a block that uses a name it does not define fails), in order,
against real PostgreSQL as the application's login and real OpenBao. The test plays
the reader's part: the schema migrated, the tenant rows the blocks name written as
README's shell line writes them (``dev add-tenant``'s own function), the settings in
the environment."""

from __future__ import annotations

import ast
import os
import re
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import sqlalchemy as sa

from tenantvault import ReconsentRequired
from tenantvault.db.models import ConfigChange, ProviderType
from tenantvault.dev.tenants import add_tenant
from tenantvault.settings import Settings
from tests.conftest import APP_LOGIN_ROLE, OAuthProvider, Services

README = Path(__file__).resolve().parents[1] / "README.md"
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_TENANT = re.compile(r'^tenant_id = "([^"]+)"', re.MULTILINE)


@dataclass(frozen=True)
class Block:
    line: int  # of the block's first line of code in README.md
    code: str

    def compiled(self) -> Any:
        # Padded so that a traceback names README.md and the line there.
        return compile("\n" * (self.line - 1) + self.code, str(README), "exec")


def python_blocks() -> list[Block]:
    text = README.read_text()
    return [
        Block(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _PYTHON_BLOCK.finditer(text)
    ]


def literal(pattern: str, code: str) -> str:
    """The first string the README's code gives in ``pattern``'s group."""
    found = re.search(pattern, code, re.MULTILINE)
    assert found is not None, f"README.md's code has no {pattern!r}"
    return found.group(1)


def add_tenant_lines() -> dict[str, str | None]:
    """README's ``tenantvault dev add-tenant ID [--name N]`` lines: id -> name."""
    added: dict[str, str | None] = {}
    for block in _BASH_BLOCK.finditer(README.read_text()):
        for line in block.group(1).splitlines():
            words = shlex.split(line, comments=True)
            if len(words) >= 3 and words[0].endswith("tenantvault") and words[1:2] == ["dev"]:
                if words[2] != "add-tenant":
                    continue
                name = words[words.index("--name") + 1] if "--name" in words else None
                added[words[3]] = name
    return added


def test_the_readme_python_blocks_compile_and_hold_no_placeholder_ellipsis() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 3
    for block in blocks:
        tree = ast.parse(block.code)  # a SyntaxError names the block's code
        ellipses = [
            node.lineno + block.line - 1
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value is Ellipsis
        ]
        assert not ellipses, f"README.md lines {ellipses}: `...` is not a value"


def test_readme_adds_each_tenant_its_blocks_name_right_before_the_first_block() -> None:
    """A reader pasting the first block has its tenant: the shell line right before it
    adds the very id, and every id a block names is added there."""
    text = README.read_text()
    first = python_blocks()[0]
    before = text[: text.index(first.code)]
    last_bash = list(_BASH_BLOCK.finditer(before))[-1]
    between = before[last_bash.end() :].strip()
    assert between == "```python", f"prose between the shell line and the block: {between!r}"
    named = {m.group(1) for block in python_blocks() for m in _TENANT.finditer(block.code)}
    added = add_tenant_lines()
    assert literal(_TENANT.pattern, first.code) in added
    assert named <= set(added), f"tenants no README line adds: {named - set(added)}"
    assert f"tenantvault dev add-tenant {literal(_TENANT.pattern, first.code)}" in last_bash[1]
    # scripts/demo ends by naming the same line.
    demo = (README.parents[0] / "scripts" / "demo").read_text()
    assert f"tenantvault dev add-tenant {literal(_TENANT.pattern, first.code)}" in demo


def test_the_first_block_ends_by_closing_its_vault() -> None:
    last = ast.parse(python_blocks()[0].code).body[-1]
    assert ast.unparse(last) == "vault.dispose()"


@pytest.fixture
def application(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    app_url: str,
    migrated: Settings,
    services: Services,
) -> list[str]:
    """The reader's part: the tenant rows README's ``dev add-tenant`` line writes
    (through the function that command runs, on the test database), and the settings
    ``Vault.from_settings()`` reads pointing at the test database (as the application's
    login) and the test OpenBao. Returns the tenant ids added."""
    owner_url = migrated.database_url.get_secret_value()
    for tenant_id, name in add_tenant_lines().items():
        assert add_tenant(owner_url, migrated.schema_name, tenant_id, name).added
    for name in list(os.environ):
        if name.startswith(("TENANTVAULT_", "VAULT_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray files read from the working directory
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", app_url)
    monkeypatch.setenv("VAULT_ADDR", services.vault_addr)
    monkeypatch.setenv("VAULT_TOKEN", services.vault_token)
    monkeypatch.setenv("TENANTVAULT_TRANSIT_KEY", "tenantvault-tests")
    return list(add_tenant_lines())


@pytest.fixture
def namespaces() -> Iterator[list[dict[str, Any]]]:
    made: list[dict[str, Any]] = []
    yield made
    for names in made:  # a block that failed midway leaves its vault open
        for value in names.values():
            if type(value).__name__ == "Vault":
                value.dispose()


def app_connections(owner_engine: sa.Engine) -> int:
    """The application login's open connections to the test database, once the server
    has seen the closed ones go (a backend ends just after its client closes)."""
    deadline = time.monotonic() + 5
    while True:
        with owner_engine.connect() as connection:
            count = int(
                connection.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND usename = :login"
                    ),
                    {"login": APP_LOGIN_ROLE},
                ).scalar_one()
            )
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def test_each_readme_python_block_runs_as_its_own_program(
    application: list[str],
    namespaces: list[dict[str, Any]],
    owner_engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    oauth_provider: OAuthProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    [tenant_id] = application
    # "Connecting a mailbox" names its test provider so: the one on loopback.
    monkeypatch.setenv("OAUTH_PROVIDER_URL", oauth_provider.url)
    blocks = python_blocks()
    printed: list[str] = []
    for block in blocks:
        names: dict[str, Any] = {"__name__": "readme"}
        namespaces.append(names)
        exec(block.compiled(), names)  # noqa: S102 - the README's own code
        printed.append(capsys.readouterr().out)
        # Each block closes what it opened: no connection of the application's login
        # outlives it (the first block's vault, left open, would hold two).
        assert app_connections(owner_engine) == 0, f"README.md line {block.line}: left open"

    first, versions, lifecycle = namespaces[:3]
    from tenantvault import Vault

    vault = Vault.from_settings()
    namespaces.append({"vault": vault})

    # Block 1: the credentials stored are the ones loaded; the token beside its config.
    password = literal(r'"password": "([^"]+)"', blocks[0].code)
    assert first["creds"].password.get_secret_value() == password
    assert first["token"].config_id == first["graph_cfg"].id
    access_token = literal(r'access_token="([^"]+)"', blocks[0].code)
    assert first["token"].access_token.get_secret_value() == access_token

    # Block 2: the versions printed before the rollback; version 1's credentials kept.
    assert [line.split()[:4] for line in printed[1].splitlines()] == [
        ["1", "created", "None", "None"],
        ["2", "credentials", "user:42", "rotated"],
    ]
    first_password = literal(r'"password": "([^"]+)"', blocks[1].code)
    rotated = literal(r'^\s+\{"password": "([^"]+)"\},$', blocks[1].code)
    assert first_password != rotated
    assert versions["old"].version == 1
    assert versions["old"].credentials.password.get_secret_value() == first_password
    cfg = versions["cfg"]
    changes = [v.change for v in vault.list_config_versions(tenant_id, cfg.id)]
    assert changes == [ConfigChange.CREATED, ConfigChange.CREDENTIALS, ConfigChange.ROLLBACK]
    assert vault.load_credentials(tenant_id, cfg.id).password.get_secret_value() == first_password

    # Block 3: deleted and restored, usage counted, the template's config made, and the
    # token that had two minutes left refreshed (the refresher ran: version 2).
    restored = vault.get_config(tenant_id, lifecycle["cfg"].id)
    assert restored.name == "SendGrid (restored)"
    assert lifecycle["sent"] == 1
    graph_app = lifecycle["graph_app"]
    assert graph_app.type == ProviderType.MICROSOFT_GRAPH
    client_secret = literal(r'"client_secret": "([^"]+)"', blocks[2].code)
    secret = vault.load_credentials(tenant_id, graph_app.id).client_secret
    assert secret.get_secret_value() == client_secret
    token = lifecycle["token"]
    assert token.config_id == lifecycle["mailbox"].id
    assert token.version == 2
    refreshed = literal(r'RefreshedToken\([^)]*?access_token="([^"]+)"', blocks[2].code)
    assert token.access_token.get_secret_value() == refreshed
    assert {c.tenant_id for c in vault.list_active_configs(tenant_id)} == {tenant_id}

    # The later blocks: warmed, the async handler's send counted, the metered load seen.
    by_name = {k: v for names in namespaces[3:] for k, v in names.items()}
    assert by_name["report"].ok
    assert by_name["response"] == {"status": "sent", "via": "SmtpCredentials"}
    async_cfg = vault.get_config_by_name(tenant_id, "Office 365 (async)")
    assert vault.usage(tenant_id, async_cfg.id, since=datetime.now(UTC).date()).sent == 1
    metrics = by_name["reader"].get_metrics_data()
    recorded = {
        metric.name
        for resource in metrics.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    assert "tenantvault.credentials.load.duration" in recorded
    assert "tenantvault.key_cache.misses" in recorded

    # "Connecting a mailbox": the user consents at the provider, the callback stores
    # the grant and a send gets its access token; once the user revokes the grant,
    # the refresh asks for re-consent and the hook hears it.
    mail = next(names for names in namespaces if "oauth_callback" in names)
    mailbox = mail["mailbox"]
    consented = requests.post(
        mail["connect"](mailbox.id),
        data={"sub": "owner@acme.example"},
        allow_redirects=False,
        timeout=10,
    )
    query = parse_qs(urlsplit(consented.headers["Location"]).query)
    mail["oauth_callback"](mailbox.id, query["code"][0], query["state"][0])
    stored = vault.load_oauth_token(tenant_id, mailbox.id).access_token
    assert mail["graph_access_token"](mailbox.id) == stored.get_secret_value()
    oauth_provider.revoke("owner@acme.example")
    with pytest.raises(ReconsentRequired):
        mail["vault"].refresh_oauth_token(tenant_id, mailbox.id, min_validity=timedelta(hours=2))
    assert f"mailbox {mailbox.id} of tenant {tenant_id}: reconsent_required" in (
        capsys.readouterr().out
    )
