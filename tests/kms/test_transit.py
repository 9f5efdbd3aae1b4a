"""The Vault transit key provider against a real OpenBao dev server."""

from __future__ import annotations

import base64
import time
import uuid

import hvac
import pytest

from tenantvault.errors import DecryptionError, KeyProviderError
from tenantvault.kms.transit import TransitKeyProvider
from tests.conftest import Services
from tests.warm_support import counted_transit


def _client(services: Services, token: str | None = None) -> hvac.Client:
    return hvac.Client(url=services.vault_addr, token=token or services.vault_token, timeout=5)


def _provider(services: Services, name: str, **kwargs: object) -> TransitKeyProvider:
    return TransitKeyProvider(_client(services), key_name=name, **kwargs)  # type: ignore[arg-type]


def test_the_key_is_created_derived_on_first_use(services: Services) -> None:
    name = f"k-{uuid.uuid4().hex[:8]}"
    provider = _provider(services, name)
    plaintext, wrapped = provider.generate_data_key("t_a")
    info = _client(services).secrets.transit.read_key(name=name)["data"]
    assert info["derived"] is True
    assert wrapped.ciphertext.startswith("vault:v1:")
    assert provider.unwrap("t_a", wrapped.ciphertext) == plaintext


def test_a_wrapped_key_does_not_unwrap_for_another_tenant(services: Services) -> None:
    provider = _provider(services, "tenantvault-tests")
    _, wrapped = provider.generate_data_key("t_a")
    with pytest.raises(DecryptionError):
        provider.unwrap("t_b", wrapped.ciphertext)


def test_a_key_that_is_not_derived_is_refused(services: Services) -> None:
    name = f"plain-{uuid.uuid4().hex[:8]}"
    _client(services).secrets.transit.create_key(name=name)
    with pytest.raises(KeyProviderError, match="not derived"):
        _provider(services, name).generate_data_key("t_a")


def test_a_token_that_may_not_create_the_key_gets_the_command_to_run(services: Services) -> None:
    root = _client(services)
    root.sys.create_or_update_policy(
        "tv-no-create", 'path "transit/datakey/*" { capabilities = ["update"] }'
    )
    token = root.auth.token.create(policies=["tv-no-create"], ttl="5m")["auth"]["client_token"]
    name = f"missing-{uuid.uuid4().hex[:8]}"
    provider = TransitKeyProvider(_client(services, token), key_name=name)
    with pytest.raises(KeyProviderError, match=f"bao write -f transit/keys/{name} derived=true"):
        provider.generate_data_key("t_a")


def test_rewrap_splits_batches_and_reports_failed_items(services: Services) -> None:
    name = f"rw-{uuid.uuid4().hex[:8]}"
    provider = _provider(services, name, batch_size=7)
    pairs = [(f"t{i}", provider.generate_data_key(f"t{i}")) for i in range(20)]
    assert provider.rotate_kek() == 2
    items = [(tenant, wrapped.ciphertext) for tenant, (_, wrapped) in pairs]
    items[5] = ("t_wrong", items[5][1])
    results = provider.rewrap(items)
    assert [r.tenant_id for r in results] == [t for t, _ in items]
    assert [i for i, r in enumerate(results) if r.error] == [5]
    for (tenant, (plaintext, _)), result in zip(pairs, results, strict=True):
        if result.wrapped is not None:
            assert result.wrapped.kek_version == 2
            assert provider.unwrap(tenant, result.wrapped.ciphertext) == plaintext


def test_batches_larger_than_the_server_accepts_are_refused_up_front(services: Services) -> None:
    with pytest.raises(ValueError, match="400"):
        _provider(services, "x", batch_size=500)


def test_approle_login_with_a_least_privilege_policy(
    services: Services, clean_environment: None
) -> None:
    from tenantvault.kms.factory import key_provider_from_settings
    from tenantvault.settings import load_settings

    root = _client(services)
    _provider(services, "approle-key").generate_data_key("t_setup")  # the operator made the key
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    root.sys.create_or_update_policy(
        "tv-app",
        'path "transit/datakey/plaintext/approle-key" { capabilities = ["update"] }\n'
        'path "transit/decrypt/approle-key" { capabilities = ["update"] }',
    )
    root.auth.approle.create_or_update_approle(
        "tenantvault", token_policies=["tv-app"], token_ttl="5m"
    )
    role_id = root.auth.approle.read_role_id("tenantvault")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("tenantvault")["data"]["secret_id"]
    settings = load_settings(
        database_url="postgresql://app@127.0.0.1/app",
        VAULT_ADDR=services.vault_addr,
        transit_key="approle-key",
        vault_approle_role_id=role_id,
        vault_approle_secret_id=secret_id,
    )
    provider = key_provider_from_settings(settings)
    plaintext, wrapped = provider.generate_data_key("t_a")
    assert provider.unwrap("t_a", wrapped.ciphertext) == plaintext
    with pytest.raises(KeyProviderError, match="may not"):
        provider.rotate_kek()  # the application's policy cannot rotate the key


def test_a_batch_the_server_refuses_as_too_large_is_halved_not_sent_one_by_one(
    services: Services,
) -> None:
    # OpenBao refuses more than 1,000 JSON strings in a request: 300 rewrap items are
    # refused whole. The provider must halve them (3 requests), not fall back to 300.
    name = f"big-{uuid.uuid4().hex[:8]}"
    provider = _provider(services, name, batch_size=400)
    client = provider._client
    items = []
    for start in range(0, 300, 100):
        batch = [
            {
                "plaintext": base64.b64encode(bytes(32)).decode(),
                "context": base64.b64encode(f"t{i}".encode()).decode(),
            }
            for i in range(start, start + 100)
        ]
        provider.ensure_key()
        answered = client.secrets.transit.encrypt_data(name=name, plaintext="", batch_input=batch)
        items += [
            (f"t{start + n}", r["ciphertext"])
            for n, r in enumerate(answered["data"]["batch_results"])
        ]
    provider.rotate_kek()
    calls = []
    real = provider._transit.rewrap_data

    def counted(**kwargs: object) -> object:
        calls.append(len(kwargs.get("batch_input") or [None]))  # type: ignore[arg-type]
        return real(**kwargs)

    provider._transit.rewrap_data = counted
    results = provider.rewrap(items)
    assert all(r.wrapped is not None and r.wrapped.kek_version == 2 for r in results)
    assert calls == [300, 150, 150]
    assert provider.unwrap("t7", results[7].wrapped.ciphertext) == bytes(32)  # type: ignore[union-attr]


def test_a_key_that_is_not_derived_is_refused_under_the_least_privilege_policy(
    services: Services,
) -> None:
    # SECURITY.md's application policy: datakey and decrypt only, so the provider may
    # not read the key's settings; it must still refuse a key that ignores the context.
    root = _client(services)
    name = f"plain-lp-{uuid.uuid4().hex[:8]}"
    root.secrets.transit.create_key(name=name)  # made without derived=true
    root.sys.create_or_update_policy(
        "tv-app-lp",
        f'path "transit/datakey/plaintext/{name}" {{ capabilities = ["update"] }}\n'
        f'path "transit/decrypt/{name}" {{ capabilities = ["update"] }}',
    )
    token = root.auth.token.create(policies=["tv-app-lp"], ttl="5m")["auth"]["client_token"]
    _, foreign = _provider(services, "tenantvault-tests").generate_data_key("t_a")
    for attempt in (
        lambda provider: provider.generate_data_key("t_a"),
        lambda provider: provider.unwrap("t_a", foreign.ciphertext),
    ):
        provider = TransitKeyProvider(_client(services, token), key_name=name, create_key=False)
        with pytest.raises(KeyProviderError, match="not derived"):
            attempt(provider)


def test_a_derived_key_passes_the_check_under_the_least_privilege_policy(
    services: Services,
) -> None:
    root = _client(services)
    name = f"derived-lp-{uuid.uuid4().hex[:8]}"
    root.secrets.transit.create_key(name=name, derived=True)
    root.sys.create_or_update_policy(
        "tv-app-lp2",
        f'path "transit/datakey/plaintext/{name}" {{ capabilities = ["update"] }}\n'
        f'path "transit/decrypt/{name}" {{ capabilities = ["update"] }}',
    )
    token = root.auth.token.create(policies=["tv-app-lp2"], ttl="5m")["auth"]["client_token"]
    provider = TransitKeyProvider(_client(services, token), key_name=name, create_key=False)
    plaintext, wrapped = provider.generate_data_key("t_a")
    assert provider.unwrap("t_a", wrapped.ciphertext) == plaintext
    with pytest.raises(DecryptionError):
        provider.unwrap("t_b", wrapped.ciphertext)


def test_an_approle_token_is_renewed_by_logging_in_again_before_it_expires(
    services: Services, clean_environment: None
) -> None:
    from tenantvault.kms.factory import key_provider_from_settings
    from tenantvault.settings import load_settings

    root = _client(services)
    _provider(services, "approle-ttl-key").generate_data_key("t_setup")
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    root.sys.create_or_update_policy(
        "tv-app-ttl",
        'path "transit/datakey/plaintext/approle-ttl-key" { capabilities = ["update"] }\n'
        'path "transit/decrypt/approle-ttl-key" { capabilities = ["update"] }',
    )
    # A token that lives 2 s and cannot be renewed past that: only a new login helps.
    root.auth.approle.create_or_update_approle(
        "tenantvault-ttl", token_policies=["tv-app-ttl"], token_ttl="2s", token_max_ttl="2s"
    )
    role_id = root.auth.approle.read_role_id("tenantvault-ttl")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("tenantvault-ttl")["data"]["secret_id"]
    provider = key_provider_from_settings(
        load_settings(
            database_url="postgresql://app@127.0.0.1/app",
            VAULT_ADDR=services.vault_addr,
            transit_key="approle-ttl-key",
            vault_approle_role_id=role_id,
            vault_approle_secret_id=secret_id,
        )
    )
    first_token = provider._client.token  # type: ignore[attr-defined]
    plaintext, wrapped = provider.generate_data_key("t_a")
    time.sleep(2.5)  # the first token has expired
    assert provider.unwrap("t_a", wrapped.ciphertext) == plaintext
    assert provider._client.token != first_token  # type: ignore[attr-defined]


def test_a_batch_unwrap_is_one_request_and_a_bad_item_fails_only_itself(
    services: Services,
) -> None:
    provider, session = counted_transit(services, key_name="tenantvault-tests", batch_size=4)
    made = [(f"t{i}", provider.generate_data_key(f"t{i}")) for i in range(6)]
    items = [(tenant, wrapped.ciphertext) for tenant, (_, wrapped) in made]
    items[2] = ("t_other", items[2][1])  # wrapped for t2: another tenant's context
    items[4] = ("t4", "no-version-prefix")  # refused before it is sent
    before = session.count("transit/decrypt/")
    results = provider.unwrap_many(items)
    assert session.count("transit/decrypt/") - before == 2  # 6 items, 4 per request
    assert [r.tenant_id for r in results] == [t for t, _ in items]
    assert [i for i, r in enumerate(results) if r.plaintext is None] == [2, 4]
    assert results[2].error == "cannot unwrap data key"
    assert results[4].error == "wrapped key has no version prefix"
    for (_, (plaintext, _)), result in zip(made, results, strict=True):
        if result.plaintext is not None:
            assert result.plaintext == plaintext
            assert plaintext.hex() not in repr(result)


def test_a_batch_unwrap_whose_every_item_fails_reports_each_without_halving(
    services: Services,
) -> None:
    # Transit answers 400 when any item fails, with every item's result: that is no
    # refusal of the request, and halving it would cost 2n - 1 requests.
    provider, session = counted_transit(services, key_name="tenantvault-tests")
    items = [("t_other", provider.generate_data_key(f"t{i}")[1].ciphertext) for i in range(8)]
    before = session.count("transit/decrypt/")
    results = provider.unwrap_many(items)
    assert session.count("transit/decrypt/") - before == 1
    assert [r.error for r in results] == ["cannot unwrap data key"] * 8


def test_a_batch_unwrap_the_server_refuses_as_too_large_is_halved(services: Services) -> None:
    # 300 items are 1,200 JSON strings: OpenBao refuses the request whole.
    provider, session = counted_transit(services, key_name="tenantvault-tests", batch_size=300)
    plaintext, wrapped = provider.generate_data_key("t_a")
    before = session.count("transit/decrypt/")
    results = provider.unwrap_many([("t_a", wrapped.ciphertext)] * 300)
    assert session.count("transit/decrypt/") - before == 3  # 300, then 150 and 150
    assert {r.plaintext for r in results} == {plaintext}
