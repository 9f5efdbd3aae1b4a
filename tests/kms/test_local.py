"""The local key provider (dev and unit tests): per-tenant wrapping, rotation, rewrap."""

from __future__ import annotations

import pickle

import pytest

from tenantvault.errors import DecryptionError
from tenantvault.kms.local import LocalKeyProvider

MASTER = bytes(range(32))


def test_a_wrapped_key_unwraps_only_for_its_tenant() -> None:
    provider = LocalKeyProvider(MASTER)
    plaintext, wrapped = provider.generate_data_key("t_a")
    assert provider.unwrap("t_a", wrapped.ciphertext) == plaintext
    with pytest.raises(DecryptionError):
        provider.unwrap("t_b", wrapped.ciphertext)


def test_rotation_then_rewrap_moves_keys_to_the_new_version_and_reports_failures() -> None:
    provider = LocalKeyProvider(MASTER, batch_size=2)
    keys = [provider.generate_data_key(f"t{i}") for i in range(5)]
    assert provider.rotate_kek() == 2
    items = [(f"t{i}", w.ciphertext) for i, (_, w) in enumerate(keys)]
    items[3] = ("t_other", items[3][1])  # a key moved to the wrong tenant
    results = provider.rewrap(items)
    assert [r.error is None for r in results] == [True, True, True, False, True]
    for (tenant, _), result, (plaintext, _) in zip(items, results, keys, strict=True):
        if result.wrapped is not None:
            assert result.wrapped.kek_version == 2
            assert provider.unwrap(tenant, result.wrapped.ciphertext) == plaintext


def test_the_provider_refuses_pickling_and_hides_its_key() -> None:
    provider = LocalKeyProvider(MASTER)
    assert MASTER.hex() not in repr(provider)
    with pytest.raises(TypeError):
        pickle.dumps(provider)


def test_a_batch_unwrap_reports_each_item_and_a_bad_one_fails_only_itself() -> None:
    provider = LocalKeyProvider(MASTER, batch_size=2)
    keys = [provider.generate_data_key(f"t{i}") for i in range(5)]
    items = [(f"t{i}", w.ciphertext) for i, (_, w) in enumerate(keys)]
    items[1] = ("t_other", items[1][1])
    results = provider.unwrap_many(items)
    assert [r.tenant_id for r in results] == [t for t, _ in items]
    assert [r.plaintext for r in results] == [
        None if i == 1 else plaintext for i, (plaintext, _) in enumerate(keys)
    ]
    assert results[1].error == "cannot unwrap data key"
