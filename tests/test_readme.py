"""README.md's Python runs as written: every ```python block, in order, as one program
(later blocks use the names of earlier ones), against real PostgreSQL as the
application's login and real OpenBao. The test plays the application's part: the
schema migrated, the tenant's row in ``tenants``, the settings in the environment."""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault.db.models import ConfigChange, ProviderType
from tests.conftest import Services

README = Path(__file__).resolve().parents[1] / "README.md"
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


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


@pytest.fixture
def application(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    app_url: str,
    owner_engine: sa.Engine,
    services: Services,
) -> str:
    """The application's part: its tenant row, and the settings ``Vault.from_settings()``
    reads pointing at the test database (as the application's login) and the test
    OpenBao. Returns the README's tenant id."""
    tenant_id = literal(r'^tenant_id = "([^"]+)"', python_blocks()[0].code)
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO dripiq_app.tenants (id, name) VALUES (:id, 'Acme')"),
            {"id": tenant_id},
        )
    for name in list(os.environ):
        if name.startswith(("TENANTVAULT_", "VAULT_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray files read from the working directory
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", app_url)
    monkeypatch.setenv("VAULT_ADDR", services.vault_addr)
    monkeypatch.setenv("VAULT_TOKEN", services.vault_token)
    monkeypatch.setenv("TENANTVAULT_TRANSIT_KEY", "tenantvault-tests")
    return tenant_id


@pytest.fixture
def namespace() -> Iterator[dict[str, Any]]:
    names: dict[str, Any] = {"__name__": "readme"}
    yield names
    vault = names.get("vault")
    if vault is not None:
        vault.dispose()


def test_the_readme_python_runs_as_one_program(
    application: str, namespace: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = python_blocks()
    for block in blocks:
        exec(block.compiled(), namespace)  # noqa: S102 - the README's own code
    printed = capsys.readouterr().out

    first, second, third = (b.code for b in blocks[:3])
    password = literal(r'"password": "([^"]+)"', first)
    rotated = literal(r'"password": "([^"]+)"', second)
    access_token = literal(r'access_token="([^"]+)"', first)
    client_secret = literal(r'"client_secret": "([^"]+)"', third)
    assert password != rotated
    ns = namespace
    vault, tenant_id, cfg = ns["vault"], application, ns["cfg"]

    # Block 1: the credentials stored are the ones loaded.
    assert ns["creds"].password.get_secret_value() == password
    # Block 2: the versions printed before the rollback; version 1's credentials kept.
    assert [line.split()[:4] for line in printed.splitlines()] == [
        ["1", "created", "None", "None"],
        ["2", "credentials", "user:42", "rotated"],
    ]
    assert ns["old"].version == 1
    assert ns["old"].credentials.password.get_secret_value() == password
    changes = [v.change for v in vault.list_config_versions(tenant_id, cfg.id)]
    assert changes[:3] == [ConfigChange.CREATED, ConfigChange.CREDENTIALS, ConfigChange.ROLLBACK]
    # Rolled back to version 1, deleted and restored: live again, version 1's password.
    assert vault.load_credentials(tenant_id, cfg.id).password.get_secret_value() == password
    assert vault.get_config(tenant_id, cfg.id).is_default is False  # restored, not default
    # Block 3: usage counted, the template's config made, the stored token still fresh.
    assert ns["sent"] == 1
    graph_app = ns["graph_app"]
    assert graph_app.type == ProviderType.MICROSOFT_GRAPH
    secret = vault.load_credentials(tenant_id, graph_app.id).client_secret
    assert secret.get_secret_value() == client_secret
    token = ns["token"]
    assert token.config_id == ns["graph_cfg"].id
    assert token.version == 1  # fresh for an hour: the refresher did not run
    assert token.access_token.get_secret_value() == access_token
    assert {c.tenant_id for c in vault.list_active_configs(tenant_id)} == {tenant_id}
    # The async block: the FastAPI-style handler ran on its own event loop through
    # AsyncVault, opened the SMTP credentials and counted one more send.
    assert ns["response"] == {"status": "sent", "via": "SmtpCredentials"}
    assert vault.usage(tenant_id, cfg.id, since=datetime.now(UTC).date()).sent == 2
    assert ns["async_vault"] is not None
    assert ns["async_vault"].engine.pool.checkedout() == 0
