"""rotate-keys status counts every seal under each data key (its AES-GCM nonce budget)
and warns long before random nonces would risk a repeat."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import InvalidInputError, Vault
from tenantvault.cli.output import print_key_status
from tenantvault.rotation.dek import rotate_data_keys
from tenantvault.rotation.status import SEALS_WARNING, key_status
from tests.conftest import fresh_keyring

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}


def _seals(report: Any, tenant: str) -> dict[int, int]:
    [entry] = [t for t in report.tenants if t.tenant_id == tenant]
    return {k.version: k.seals for k in entry.keys}


def test_every_seal_is_counted_against_its_key_and_a_rollback_counts_none(
    vault: Vault, operator_db: Any, provider: Any, owner_engine: sa.Engine
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="R", config=SMTP, credentials={"password": "p"}
    )  # 2 seals: the row and its history copy
    vault.store_credentials("t_a", cfg.id, {"password": "q"})  # 2 more
    vault.store_oauth_token("t_a", cfg.id, access_token="a", refresh_token="r")  # 2 more
    with pytest.raises(InvalidInputError, match="name"):  # rolled back, with its seals
        vault.create_config(
            "t_a", type="smtp", name="R", config=SMTP, credentials={"password": "x"}
        )
    assert _seals(key_status(operator_db, provider, ["t_a"]), "t_a") == {1: 6}
    rotate_data_keys(operator_db, fresh_keyring(provider), ["t_a"])
    # Re-sealing counts against the new key: the live credentials, 2 kept versions, 2 tokens.
    assert _seals(key_status(operator_db, provider, ["t_a"]), "t_a") == {1: 6, 2: 5}


def test_a_key_near_its_nonce_budget_is_flagged_for_rotation(
    vault: Vault, operator_db: Any, provider: Any, owner_engine: sa.Engine, capsys: Any
) -> None:
    vault.create_config("t_a", type="smtp", name="R", config=SMTP, credentials={"password": "p"})
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE dripiq_app.tenant_data_keys SET seals = :n"), {"n": SEALS_WARNING}
        )
    report = key_status(operator_db, provider, ["t_a"])
    assert report.nonce_budget_low == 1
    print_key_status(report, json_lines=False)
    out = capsys.readouterr().out
    assert f"{SEALS_WARNING} seals: ROTATE (nonce budget)" in out
    assert "1 data keys past" in out
