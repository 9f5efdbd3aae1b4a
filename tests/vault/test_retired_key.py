"""A retired data key opens nothing (issue 21, item 6): SECURITY.md's playbook for a
leaked plaintext data key, run against real PostgreSQL and OpenBao.

The playbook: ``rotate-keys dek --tenant T``. After it, the old key (leaked, say, in a
core dump) must not open or forge any value the application accepts: not on the hot
path of a process that still holds it in its cache (the rotation ran in another
process), not on the full path with it cached, and not on the full path that fetches
and unwraps it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import DecryptionError, KeyDestroyedError
from tenantvault.crypto.datakey import DataKey
from tenantvault.crypto.envelope import seal
from tenantvault.keys.sealed import ACCESS_TOKEN, CONFIG_CREDENTIALS, REFRESH_TOKEN
from tenantvault.rotation.dek import rotate_data_keys
from tenantvault.rotation.options import DekRotationOptions
from tenantvault.rotation.shred import shred_tenant
from tests.conftest import CountingProvider, fresh_keyring
from tests.rotation_support import GRAPH, GRAPH_TOKEN, SMTP, key_states
from tests.support import write_as_app

PASSWORD = "the-real-password"


def _one(owner_engine: sa.Engine, query: str, **params: object) -> Any:
    with owner_engine.connect() as connection:
        return connection.execute(sa.text(query), params).one()


def _leak_key(owner_engine: sa.Engine, provider: CountingProvider) -> tuple[DataKey, str]:
    """Data key 1 of t_a in plain bytes, as a core dump would leak it (test-only: unwrapped
    through transit), and its wrapped form."""
    (wrapped,) = _one(
        owner_engine,
        "SELECT wrapped_key FROM dripiq_app.tenant_data_keys "
        "WHERE tenant_id = 't_a' AND version = 1",
    )
    return DataKey("t_a", 1, provider.inner.unwrap("t_a", wrapped)), str(wrapped)


def _forge_credentials(owner_engine: sa.Engine, app_url: str, key: DataKey, config_id: str) -> None:
    """Credentials sealed under ``key`` exactly as tenantvault seals them for the row at
    its next version (the database takes a new sealed value only with a new version),
    written by the application's login with that version."""
    kind, version, config = _one(
        owner_engine,
        "SELECT type, version, config FROM dripiq_app.email_provider_configs WHERE id = :id",
        id=config_id,
    )
    place = CONFIG_CREDENTIALS.place("t_a", config_id, bound=(kind, version + 1), config=config)
    forged = seal(key, json.dumps({"password": "forged"}).encode(), place)
    write_as_app(
        app_url,
        "UPDATE dripiq_app.email_provider_configs SET encrypted_credentials = %(v)s, "
        "version = version + 1 WHERE id = %(id)s",
        v=forged,
        id=config_id,
    )


def _forge_tokens(owner_engine: sa.Engine, app_url: str, key: DataKey, config_id: str) -> None:
    """Both tokens of the config's token row sealed under ``key`` for that row at its next
    version and for its config, exactly as tenantvault seals them, written so."""
    row_id, version, kind, config = _one(
        owner_engine,
        "SELECT t.id, t.version, c.type, c.config FROM dripiq_app.email_provider_tokens t "
        "JOIN dripiq_app.email_provider_configs c ON c.id = t.config_id "
        "WHERE t.config_id = :id",
        id=config_id,
    )
    bound = (row_id, version + 1, kind)
    access = seal(
        key, b"forged-access", ACCESS_TOKEN.place("t_a", config_id, bound=bound, config=config)
    )
    refresh = seal(
        key, b"forged-refresh", REFRESH_TOKEN.place("t_a", config_id, bound=bound, config=config)
    )
    write_as_app(
        app_url,
        "UPDATE dripiq_app.email_provider_tokens SET encrypted_access_token = %(a)s, "
        "encrypted_refresh_token = %(r)s, version = version + 1 WHERE config_id = %(id)s",
        a=access,
        r=refresh,
        id=config_id,
    )


def test_after_a_dek_rotation_the_old_key_opens_and_forges_nothing(
    vault: Any,
    operator_db: Any,
    provider: CountingProvider,
    owner_engine: sa.Engine,
    app_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    smtp = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": PASSWORD}
    )
    graph = vault.create_config(
        "t_a",
        type="microsoft_graph",
        name="Graph",
        config=GRAPH,
        credentials={"client_secret": "cs"},
    )
    vault.store_oauth_token("t_a", graph.id, **GRAPH_TOKEN)
    # This process serves t_a: key 1 is in its cache.
    assert vault.load_credentials("t_a", smtp.id).password.get_secret_value() == PASSWORD
    assert vault.load_oauth_token("t_a", graph.id).access_token.get_secret_value() == "access-one"
    leaked, wrapped = _leak_key(owner_engine, provider)

    # The playbook: rotate the tenant's data key, in another process (its own cache).
    report = rotate_data_keys(operator_db, fresh_keyring(provider), ["t_a"], DekRotationOptions())
    assert report.ok, report
    assert key_states(owner_engine, "t_a") == {1: "retired", 2: "active"}
    # Everything the tenant had opens, re-sealed under key 2.
    assert vault.load_credentials("t_a", smtp.id).password.get_secret_value() == PASSWORD
    assert vault.load_oauth_token("t_a", graph.id).access_token.get_secret_value() == "access-one"
    assert (
        vault.keyring.cache.get("t_a", 1) is not None
    )  # still cached here: the rotation ran elsewhere

    _forge_credentials(owner_engine, app_url, leaked, smtp.id)
    _forge_tokens(owner_engine, app_url, leaked, graph.id)

    def stale_cache() -> None:
        """Key 1 in this process's cache, as the process that cached it before the
        rotation holds it (until its max age)."""
        vault.keyring.cache.put(leaked, wrapped)

    caplog.set_level(logging.WARNING, logger="tenantvault")
    refused: list[tuple[str, Callable[[], Any]]] = [
        ("hot path, key cached", lambda: vault.load_credentials("t_a", smtp.id)),
        ("token hot path, key cached", lambda: vault.load_oauth_token("t_a", graph.id)),
        (
            "full path, key cached",
            lambda: vault.get_config("t_a", smtp.id, with_credentials=True),
        ),
        ("full path, many, key cached", lambda: vault.load_many_credentials("t_a", [smtp.id])),
    ]
    for what, load in refused:
        stale_cache()
        with pytest.raises(DecryptionError):  # DID NOT RAISE: the forged value opened
            load()
        # The retired key left this process's cache.
        assert vault.keyring.cache.get("t_a", 1) is None, what
    # The full path that fetches and unwraps the key: nothing cached.
    for load in (
        lambda: vault.load_credentials("t_a", smtp.id),
        lambda: vault.load_oauth_token("t_a", graph.id),
    ):
        vault.keyring.cache.clear()
        unwraps = provider.calls.get("unwrap", 0)
        with pytest.raises(DecryptionError):
            load()
        assert provider.calls.get("unwrap", 0) == unwraps  # refused before asking transit
    assert "names retired data key 1: refused" in caplog.text
    assert PASSWORD not in caplog.text
    assert "forged" not in caplog.text
    # The tenant's genuine values still open, on the hot path (no unwrap once cached).
    graph_creds = vault.load_credentials("t_a", graph.id)
    assert graph_creds.client_secret.get_secret_value() == "cs"
    calls = dict(provider.calls)
    assert vault.load_credentials("t_a", graph.id).client_secret.get_secret_value() == "cs"
    assert provider.calls == calls


def test_a_process_holding_a_key_of_a_shredded_tenant_opens_nothing(
    vault: Any, operator_db: Any
) -> None:
    smtp = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": PASSWORD}
    )
    assert vault.load_credentials("t_a", smtp.id).password.get_secret_value() == PASSWORD
    shred_tenant(operator_db, "t_a")  # another process: this one's cache still holds the key
    assert vault.keyring.cache.get("t_a", 1) is not None
    with pytest.raises(KeyDestroyedError):
        vault.load_credentials("t_a", smtp.id)
    assert vault.keyring.cache.get("t_a", 1) is None
