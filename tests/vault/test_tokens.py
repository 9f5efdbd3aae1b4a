"""OAuth token refresh against real PostgreSQL and OpenBao: many callers in several
processes and threads, the refresher runs exactly once, everyone gets the new token;
a refresher that fails leaves the old token in place."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tenantvault import InvalidInputError, OAuthToken, RefreshedToken, Vault
from tenantvault.settings import Settings
from tests.conftest import Services, child_environment
from tests.rotation_support import GRAPH

# Each child process runs THREADS callers that all wait for the start file, then refresh.
# The refresher logs every call to a shared file, checks it got the current refresh
# token, and takes a while (as a provider round trip does) so the callers overlap.
# With "managed" for the refresher, they refresh without one (tenantvault's own request:
# tests/vault/test_oauth.py).
CHILD = textwrap.dedent(
    """
    import os, sys, threading, time
    from datetime import UTC, datetime, timedelta
    from tenantvault import RefreshedToken, Vault
    from tenantvault.settings import load_settings

    tenant, config_id, log_path, start_path, threads, mode = sys.argv[1:7]
    vault = Vault.from_settings(load_settings())

    def refresher(current):
        assert current.refresh_token.get_secret_value() == "refresh-one"
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()}\\n")
        time.sleep(0.3)
        return RefreshedToken(
            access_token="access-two",
            refresh_token="refresh-two",
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        )

    results = []
    def call():
        while not os.path.exists(start_path):
            time.sleep(0.005)
        token = vault.refresh_oauth_token(
            tenant, config_id, None if mode == "managed" else refresher
        )
        results.append((token.access_token.get_secret_value(), token.version))

    workers = [threading.Thread(target=call) for _ in range(int(threads))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for access, version in results:
        print(access, version)
    vault.dispose()
    """
)


def refresh_in_children(
    environment: dict[str, str],
    config_id: str,
    tmp_path: Path,
    mode: str,
    *,
    log: Path | None = None,
    started: Callable[[], object] = lambda: None,
    processes: int = 3,
    threads: int = 4,
) -> list[list[str]]:
    """CHILD in ``processes`` processes of ``threads`` callers each, refreshing t_a's
    ``config_id`` together (``mode``: "callable" or "managed"); ``started`` is called as
    they are let go. Every caller's (access token, version)."""
    start = tmp_path / "start"
    arguments = ["t_a", config_id, str(log or "-"), str(start), str(threads), mode]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, *arguments],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    time.sleep(1.5)  # let every child import and reach its start line
    started()
    start.touch()
    outputs = [child.communicate(timeout=120) for child in children]
    assert [child.returncode for child in children] == [0] * processes, [e for _, e in outputs]
    return [line.split() for out, _ in outputs for line in out.splitlines()]


def _stored_token(vault: Vault) -> str:
    cfg = vault.create_config(
        "t_a", type="microsoft_graph", name="G", config=GRAPH, credentials={"client_secret": "cs"}
    )
    vault.store_oauth_token(
        "t_a",
        cfg.id,
        access_token="access-one",
        refresh_token="refresh-one",
        expires_at=datetime.now(UTC) + timedelta(seconds=30),
        scopes=["Mail.Send"],
    )
    return cfg.id


def test_concurrent_refreshes_in_several_processes_run_the_refresher_exactly_once(
    vault: Vault, app_settings: Settings, services: Services, tmp_path: Path
) -> None:
    config_id = _stored_token(vault)
    log = tmp_path / "refresher.log"
    processes, threads = 3, 4
    results = refresh_in_children(
        child_environment(app_settings, services), config_id, tmp_path, "callable", log=log
    )
    assert len(results) == processes * threads, results
    assert {tuple(r) for r in results} == {("access-two", "2")}
    assert len(log.read_text().splitlines()) == 1
    token = vault.load_oauth_token("t_a", config_id)
    assert token.refresh_token is not None
    assert (token.refresh_token.get_secret_value(), token.version) == ("refresh-two", 2)
    assert token.scopes == ("Mail.Send",)


def test_a_refresher_that_raises_leaves_the_old_token(
    vault: Vault, owner_engine: sa.Engine
) -> None:
    config_id = _stored_token(vault)

    def failing(current: OAuthToken) -> RefreshedToken:
        raise RuntimeError("provider said invalid_grant")

    with pytest.raises(RuntimeError, match="invalid_grant"):
        vault.refresh_oauth_token("t_a", config_id, failing)
    token = vault.load_oauth_token("t_a", config_id)
    assert token.access_token is not None
    assert (token.access_token.get_secret_value(), token.version) == ("access-one", 1)
    with owner_engine.connect() as connection:
        refreshed = connection.execute(
            sa.text("SELECT count(*) FROM dripiq_app.audit_events WHERE action = 'token.refreshed'")
        ).scalar_one()
    assert refreshed == 0

    def malformed(current: OAuthToken) -> RefreshedToken:
        return RefreshedToken(access_token="", expires_at=None)

    with pytest.raises(InvalidInputError, match="access_token"):
        vault.refresh_oauth_token("t_a", config_id, malformed)
    assert vault.load_oauth_token("t_a", config_id).version == 1


def test_a_fresh_token_is_returned_without_calling_the_refresher(vault: Vault) -> None:
    config_id = _stored_token(vault)
    calls: list[int] = []

    def refresher(current: OAuthToken) -> RefreshedToken:
        calls.append(1)
        return RefreshedToken("access-two", datetime.now(UTC) + timedelta(hours=1))

    token = vault.refresh_oauth_token(
        "t_a", config_id, refresher, min_validity=timedelta(seconds=5)
    )
    assert (calls, token.version) == ([], 1)
    later = datetime.now(UTC) + timedelta(minutes=1)
    token = vault.refresh_oauth_token("t_a", config_id, refresher, now=later)
    assert (calls, token.version) == ([1], 2)
    # No new refresh token from the provider: the old one is kept.
    assert token.refresh_token is not None
    assert token.refresh_token.get_secret_value() == "refresh-one"
    assert "access-two" not in repr(RefreshedToken("access-two", None))


def test_expiring_tokens_are_listed_for_the_refresher(vault: Vault) -> None:
    config_id = _stored_token(vault)
    soon = vault.tokens_expiring("t_a", within=timedelta(minutes=5))
    assert [(t.config_id, t.refreshable) for t in soon] == [(config_id, True)]
    assert vault.tokens_expiring("t_a", within=timedelta(seconds=1)) == []
