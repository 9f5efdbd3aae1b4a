"""Sealed values: known answers pin the format; any change, move or truncation fails
with the one DecryptionError, which says nothing useful to an attacker."""

from __future__ import annotations

import base64
import json
import pickle
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from tenantvault.crypto.datakey import DataKey
from tenantvault.crypto.envelope import SealContext, open_sealed, reseal, seal, sealed_dek_version
from tenantvault.errors import DecryptionError

VECTORS_DIR = Path(__file__).parents[1] / "vectors"
V1 = json.loads((VECTORS_DIR / "envelope_v1.json").read_text())["vectors"]
V2 = json.loads((VECTORS_DIR / "envelope_v2.json").read_text())["vectors"]
V3 = json.loads((VECTORS_DIR / "envelope_v3.json").read_text())["vectors"]
KEY = DataKey("t_acme", 3, bytes(range(32)))
PLACE = SealContext("t_acme", "email_provider_configs", "encrypted_credentials", "tvrow1")


def _vector(v: dict[str, object], *, legacy: bool = False) -> tuple[DataKey, SealContext]:
    """The key and place of a vector; ``legacy``: its binding given as format 2's."""
    key = DataKey(str(v["tenant_id"]), int(str(v["dek_version"])), bytes.fromhex(str(v["key_hex"])))
    binding = bytes.fromhex(str(v.get("binding_hex", "")))
    return key, SealContext(
        str(v["tenant_id"]),
        str(v["table"]),
        str(v["column"]),
        str(v["row_id"]),
        b"" if legacy else binding,
        binding if legacy else None,
    )


def _ids(v: dict[str, object]) -> str:
    return f"{v['tenant_id']}-v{v['dek_version']}"


@pytest.mark.parametrize("vector", V3, ids=_ids)
def test_known_answer_vectors_seal_and_open_exactly(vector: dict[str, object]) -> None:
    key, place = _vector(vector)
    plaintext = bytes.fromhex(str(vector["plaintext_hex"]))
    assert (
        seal(key, plaintext, place, nonce=bytes.fromhex(str(vector["nonce_hex"])))
        == vector["sealed"]
    )
    assert open_sealed(key, str(vector["sealed"]), place) == plaintext


@pytest.mark.parametrize("vector", V1, ids=_ids)
def test_format_1_vectors_open_only_while_the_legacy_format_is_allowed(
    vector: dict[str, object],
) -> None:
    key, place = _vector(vector)
    sealed = str(vector["sealed"])
    assert open_sealed(key, sealed, place).hex() == vector["plaintext_hex"]
    with pytest.raises(DecryptionError, match=r"^cannot open sealed value$"):
        open_sealed(key, sealed, place, allow_legacy=False)
    # Re-sealing moves it to the current format, for the same place.
    resealed = reseal(sealed, place, lambda _: key, key)
    assert resealed.startswith(f"tv3.{vector['dek_version']}.")
    assert open_sealed(key, resealed, place, allow_legacy=False).hex() == vector["plaintext_hex"]


def _aad(fmt: int, vector: dict[str, object]) -> bytes:
    parts = [
        f"tenantvault.sealed.v{fmt}".encode(),
        f"tv{fmt}.{vector['dek_version']}.".encode(),
        str(vector["tenant_id"]).encode(),
        f"{vector['table']}.{vector['column']}".encode(),
        str(vector["row_id"]).encode(),
    ]
    if fmt >= 2:
        parts.append(bytes.fromhex(str(vector["binding_hex"])))
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


@pytest.mark.parametrize(
    ("fmt", "vector"),
    [(1, v) for v in V1] + [(2, v) for v in V2] + [(3, v) for v in V3],
    ids=lambda x: str(x)[:12],
)
def test_vectors_follow_the_documented_layout_independently_of_the_code(
    fmt: int, vector: dict[str, object]
) -> None:
    sealed = str(vector["sealed"])
    prefix, version, body = sealed.split(".")
    assert (prefix, int(version)) == (f"tv{fmt}", vector["dek_version"])
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    key = AESGCM(bytes.fromhex(str(vector["key_hex"])))
    plaintext = key.decrypt(raw[:12], raw[12:], _aad(fmt, vector))
    assert plaintext.hex() == vector["plaintext_hex"]
    assert raw[:12].hex() == vector["nonce_hex"]


@pytest.mark.parametrize("vector", V2, ids=_ids)
def test_format_2_vectors_open_only_where_their_legacy_binding_is_given(
    vector: dict[str, object],
) -> None:
    key, place = _vector(vector, legacy=True)
    sealed = str(vector["sealed"])
    assert open_sealed(key, sealed, place).hex() == vector["plaintext_hex"]
    # Without the legacy binding (a place that takes format 3 only), it does not open.
    _refuses(sealed, key, SealContext(place.tenant_id, place.table, place.column, place.row_id))
    # Re-sealing binds it to the current binding, in format 3; the old one no longer opens it.
    current = SealContext(place.tenant_id, place.table, place.column, place.row_id, b"now")
    moved = SealContext(
        place.tenant_id, place.table, place.column, place.row_id, b"now", place.legacy_binding
    )
    resealed = reseal(sealed, moved, lambda _: key, key)
    assert resealed.startswith(f"tv3.{vector['dek_version']}.")
    assert open_sealed(key, resealed, current) == bytes.fromhex(str(vector["plaintext_hex"]))
    _refuses(resealed, key, place)


def test_a_value_served_with_another_binding_fails_to_open() -> None:
    sealed = seal(KEY, b"secret", SealContext("t_acme", "t", "c", "r", b"config:2:digest"))
    for binding in (b"config:3:digest", b"config:2:other", b""):
        _refuses(sealed, place=SealContext("t_acme", "t", "c", "r", binding))


@given(st.binary(max_size=4096))
def test_open_of_seal_is_the_identity(plaintext: bytes) -> None:
    assert open_sealed(KEY, seal(KEY, plaintext, PLACE), PLACE) == plaintext


def test_each_seal_uses_a_fresh_nonce() -> None:
    assert seal(KEY, b"same", PLACE) != seal(KEY, b"same", PLACE)


def _refuses(sealed: str, key: DataKey = KEY, place: SealContext = PLACE) -> None:
    with pytest.raises(DecryptionError) as error:
        open_sealed(key, sealed, place)
    assert str(error.value) == "cannot open sealed value"  # the same words, whatever went wrong


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=200), st.data())
def test_any_changed_character_fails_to_open(plaintext: bytes, data: st.DataObject) -> None:
    sealed = seal(KEY, plaintext, PLACE)
    index = data.draw(st.integers(0, len(sealed) - 1))
    replacement = data.draw(st.sampled_from("ABCabc019-_.x="))
    if replacement == sealed[index]:
        return
    _refuses(sealed[:index] + replacement + sealed[index + 1 :])


@given(st.binary(max_size=200), st.data())
def test_any_truncation_fails_to_open(plaintext: bytes, data: st.DataObject) -> None:
    sealed = seal(KEY, plaintext, PLACE)
    _refuses(sealed[: data.draw(st.integers(0, len(sealed) - 1))])


def test_an_edited_header_fails_even_with_a_key_of_that_version() -> None:
    sealed = seal(KEY, b"secret", PLACE)
    edited = sealed.replace("tv3.3.", "tv3.4.", 1)
    _refuses(edited, DataKey("t_acme", 4, bytes(range(32))))


@pytest.mark.parametrize(
    "moved",
    [
        SealContext("t_acme", "email_provider_configs", "encrypted_credentials", "tvrow2"),
        SealContext("t_acme", "email_provider_tokens", "encrypted_access_token", "tvrow1"),
        SealContext("t_globex", "email_provider_configs", "encrypted_credentials", "tvrow1"),
        # Length-prefixed parts: shifting characters between fields is a different place.
        SealContext("t_acm", "e" + "mail_provider_configs", "encrypted_credentials", "tvrow1"),
    ],
    ids=["other-row", "other-column", "other-tenant", "shifted-fields"],
)
def test_a_value_moved_to_another_place_fails_to_open(moved: SealContext) -> None:
    _refuses(seal(KEY, b"secret", PLACE), place=moved)


def test_the_wrong_key_fails_to_open() -> None:
    _refuses(seal(KEY, b"secret", PLACE), DataKey("t_acme", 3, bytes(32)))


@pytest.mark.parametrize(
    "garbage",
    ["", "tv1", "tv1.0.AAAA", "tv1.01.AAAA", "tv4.1.AAAA", "tv1.1.!!!!", "tv2.99999999999.AAAA"],
)
def test_malformed_values_fail_the_same_way(garbage: str) -> None:
    with pytest.raises(DecryptionError, match=r"^cannot open sealed value$"):
        sealed_dek_version(garbage)


def test_the_header_names_the_key_version() -> None:
    assert sealed_dek_version(seal(KEY, b"x", PLACE)) == 3


def test_data_keys_stay_out_of_repr_and_refuse_pickling() -> None:
    assert bytes(range(32)).hex() not in repr(KEY)
    assert "hidden" in repr(KEY)
    with pytest.raises(TypeError):
        pickle.dumps(KEY)
    with pytest.raises(ValueError, match="32 bytes"):
        DataKey("t", 1, b"short")


def test_reseal_moves_a_value_to_the_new_key_and_keeps_its_place_and_plaintext() -> None:
    new_key = DataKey("t_acme", 4, bytes(range(1, 33)))
    old = seal(KEY, b"the secret", PLACE)
    asked: list[int] = []

    def key_of(version: int) -> DataKey:
        asked.append(version)
        return KEY

    moved = reseal(old, PLACE, key_of, new_key)
    assert asked == [3]
    assert sealed_dek_version(moved) == 4
    assert open_sealed(new_key, moved, PLACE) == b"the secret"
    with pytest.raises(DecryptionError):
        open_sealed(new_key, moved, SealContext("t_acme", "t", "c", "other-row"))
    tampered = old[:-2] + ("A" if old[-2] != "A" else "B") + old[-1]
    with pytest.raises(DecryptionError):
        reseal(tampered, PLACE, key_of, new_key)
