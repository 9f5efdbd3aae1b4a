"""The keyring against real PostgreSQL and OpenBao: the cache serves only committed keys."""

from __future__ import annotations

import base64
import os
import pickle
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.orm import Session

from tenantvault import Vault
from tenantvault.crypto.datakey import DataKey
from tenantvault.crypto.envelope import SealContext, header, open_sealed, seal
from tenantvault.keys.cache import DataKeyCache
from tenantvault.keys.keyring import Keyring
from tenantvault.settings import Settings
from tests.conftest import CountingProvider, fresh_keyring

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}


@pytest.fixture
def other_vault(app_settings: Settings, provider: CountingProvider) -> Iterator[Vault]:
    """A second application process: its own engine and its own key cache."""
    built = Vault.from_settings(app_settings, key_provider=provider)
    yield built
    built.dispose()


def test_a_first_key_rolled_back_never_seals_a_later_secret(
    vault: Vault, other_vault: Vault, app_settings: Settings, provider: CountingProvider
) -> None:
    # This process makes the tenant's first key in a transaction that rolls back...
    with Session(vault.engine) as session, session.begin():
        vault.create_config(
            "t_a",
            type="smtp",
            name="gone",
            config=SMTP,
            credentials={"password": "x"},
            session=session,
        )
        session.rollback()
    # ...while another process commits a different version 1.
    theirs = other_vault.create_config(
        "t_a", type="smtp", name="theirs", config=SMTP, credentials={"password": "theirs"}
    )
    ours = vault.create_config(
        "t_a", type="smtp", name="ours", config=SMTP, credentials={"password": "ours"}
    )
    token_config = vault.create_config(
        "t_a", type="smtp", name="with token", config=SMTP, credentials={"password": "t"}
    )
    vault.store_oauth_token("t_a", token_config.id, access_token="access-ours")
    fresh = Vault.from_settings(app_settings, key_provider=provider)
    try:
        for reader in (fresh, other_vault, vault):
            opened = {
                config_id: reader.load_credentials("t_a", config_id).password.get_secret_value()  # type: ignore[union-attr]
                for config_id in (theirs.id, ours.id)
            }
            assert opened == {theirs.id: "theirs", ours.id: "ours"}
            token = reader.load_oauth_token("t_a", token_config.id)
            assert token.access_token is not None
            assert token.access_token.get_secret_value() == "access-ours"
    finally:
        fresh.dispose()


def test_a_key_made_in_a_joined_transaction_opens_there_and_is_not_cached(
    vault: Vault,
) -> None:
    with Session(vault.engine) as session, session.begin():
        made = vault.create_config(
            "t_b",
            type="smtp",
            name="joined",
            config=SMTP,
            credentials={"password": "p"},
            session=session,
        )
        seen = vault.get_config("t_b", made.id, with_credentials=True, session=session)
        assert seen.credentials.password.get_secret_value() == "p"  # type: ignore[union-attr]
        assert vault.keyring.cache.get("t_b", 1) is None
        session.rollback()
    assert vault.keyring.cache.get("t_b", 1) is None


def test_a_cached_key_is_served_only_for_the_wrapping_it_came_from() -> None:
    cache = DataKeyCache(max_age_seconds=60, max_entries=10, max_uses=100)
    phantom = DataKey("t", 1, b"\x01" * 32)
    stored = DataKey("t", 1, b"\x02" * 32)
    cache.put(phantom, "vault:v1:phantom")
    assert cache.get_or_load("t", 1, lambda: stored, wrapped="vault:v1:stored") == stored
    assert cache.get_or_load("t", 1, lambda: phantom, wrapped="vault:v1:stored") == stored
    assert cache.get("t", 1) == stored


def test_a_new_key_asked_for_ahead_shows_no_bytes_and_serves_only_its_tenant(
    provider: CountingProvider, operator_db: Any
) -> None:
    keyring = fresh_keyring(provider)
    made = keyring.new_key("t_b")
    assert repr(made) == (
        f"NewKey(tenant_id='t_b', kek_ref='transit:tenantvault-tests', "
        f"kek_version={made.wrapped.kek_version})"
    )
    assert not hasattr(made, "plaintext")
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(made)
    with pytest.raises(ValueError, match="the tenant it was made for"):
        keyring.switch(operator_db.transaction, "t_a", 1, "test", new_key=made)


@pytest.mark.parametrize("fmt", [1, 2])
def test_the_hot_path_opens_no_older_format_without_asking_the_database(fmt: int) -> None:
    # The hot statements no longer return the database's answer for an older value
    # (migration 0017): the cache-only open leaves any such value to the full path,
    # which asks tenantvault_legacy_opens, even when its key is cached and would open it.
    key = DataKey("t", 1, os.urandom(32))
    cache = DataKeyCache(max_age_seconds=60, max_entries=10, max_uses=100)
    cache.put(key)
    # A provider nobody may call: only its reference is read.
    keyring = Keyring(SimpleNamespace(ref="transit:unused"), cache, allow_legacy=True)  # type: ignore[arg-type]
    place = SealContext("t", "email_provider_configs", "encrypted_credentials", "c1", b"b3", b"b2")
    prefix = header(1, fmt)
    nonce = os.urandom(12)
    body = AESGCM(key.material()).encrypt(nonce, b"old", place.associated_data(prefix, fmt))
    older = prefix + base64.urlsafe_b64encode(nonce + body).decode().rstrip("=")
    assert open_sealed(key, older, place) == b"old"  # the key opens it: refusing is the rule
    assert keyring.open_cached("t", older, place, oldest_usable_version=1) is None
    current = seal(key, b"new", place)
    assert keyring.open_cached("t", current, place, oldest_usable_version=1) == b"new"
