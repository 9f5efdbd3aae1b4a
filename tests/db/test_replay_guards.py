"""A row restored whole — its version with the ciphertext sealed for it — is refused by
the database (migration 0015's triggers), for every way the application's login can
put one back: an UPDATE lowering the version, a sealed value put back at the same
version (after a purge, after pruning), a deleted token grant or config inserted
again, a purged or pruned history row inserted again, an id moved onto another row.
The legitimate paths around them keep working. Real PostgreSQL, as the application's
own login (row-level security applies, with the application role's grants), and real
OpenBao."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
import psycopg.types.json
import pytest
import sqlalchemy as sa

from tenantvault import Vault
from tenantvault.db.operator import OperatorDatabase
from tenantvault.ops.purge import purge_deleted_configs
from tests.support import write_as_app

SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}
OAUTH = {**SMTP, "auth_type": "oauth2"}
CONFIGS = "dripiq_app.email_provider_configs"
TOKENS = "dripiq_app.email_provider_tokens"
VERSIONS = "dripiq_app.email_provider_config_versions"


def _refused(app_url: str, statement: str, match: str, **params: object) -> None:
    with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match=match):
        write_as_app(app_url, statement, **params)


def _row(owner_engine: sa.Engine, table: str, where: str, **params: object) -> dict[str, Any]:
    with owner_engine.connect() as connection:
        return dict(
            connection.execute(sa.text(f"SELECT * FROM {table} WHERE {where}"), params)
            .mappings()
            .one()
        )


def _password(vault: Vault, config_id: str) -> str:
    creds: Any = vault.load_credentials("t_a", config_id)
    return str(creds.password.get_secret_value())


def test_a_config_restored_whole_at_an_older_version_is_refused(
    vault: Vault, app_url: str, owner_engine: sa.Engine
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": "old"}
    )
    old = _row(owner_engine, CONFIGS, "id = :id", id=cfg.id)
    vault.store_credentials("t_a", cfg.id, {"password": "new"})  # version 2
    _refused(
        app_url,
        f"UPDATE {CONFIGS} SET version = %(v)s, config = %(c)s::jsonb, "
        "encrypted_credentials = %(e)s WHERE id = %(id)s",
        "version may not go down",
        v=old["version"],
        c=psycopg.types.json.Jsonb(old["config"]),
        e=old["encrypted_credentials"],
        id=cfg.id,
    )
    vault.keyring.cache.clear()
    assert _password(vault, cfg.id) == "new"
    # An id moved onto another row is refused too.
    other = vault.create_config(
        "t_a", type="smtp", name="Other", config=SMTP, credentials={"password": "other"}
    )
    _refused(
        app_url,
        f"UPDATE {CONFIGS} SET id = %(new)s WHERE id = %(id)s",
        "its key may not change",
        new="tv" + "0" * 32,
        id=other.id,
    )


def test_a_purged_config_gets_neither_its_credentials_nor_its_history_back(
    vault: Vault, app_url: str, owner_engine: sa.Engine, operator_db: OperatorDatabase
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": "secret"}
    )
    live = _row(owner_engine, CONFIGS, "id = :id", id=cfg.id)
    kept = _row(owner_engine, VERSIONS, "config_id = :id AND version = 1", id=cfg.id)
    vault.delete_config("t_a", cfg.id)
    purged = purge_deleted_configs(operator_db, older_than=timedelta(0))
    assert [(p.config_id, p.versions) for p in purged.configs] == [(cfg.id, 1)]
    # The soft-deleted row, its sealed value put back at the version it was sealed for.
    _refused(
        app_url,
        f"UPDATE {CONFIGS} SET encrypted_credentials = %(e)s, deleted_at = NULL WHERE id = %(id)s",
        "may change only with a new version",
        e=live["encrypted_credentials"],
        id=cfg.id,
    )
    # Its history row inserted again, whole.
    columns = ", ".join(kept)
    values = ", ".join(f"%({c})s" for c in kept)
    _refused(
        app_url,
        f"INSERT INTO {VERSIONS} ({columns}) VALUES ({values})",
        "already kept a version 1 or later",
        **{**kept, "config": psycopg.types.json.Jsonb(kept["config"])},
    )
    # What is legitimate still works: restored, then given credentials as version 2.
    vault.restore_config("t_a", cfg.id)
    vault.store_credentials("t_a", cfg.id, {"password": "fresh"})
    assert _password(vault, cfg.id) == "fresh"
    assert [v.version for v in vault.list_config_versions("t_a", cfg.id)] == [2]


def test_a_pruned_history_secret_is_not_put_back(
    vault: Vault, app_url: str, owner_engine: sa.Engine
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="Relay", config=SMTP, credentials={"password": "one"}
    )
    kept = _row(owner_engine, VERSIONS, "config_id = :id AND version = 1", id=cfg.id)
    where = "WHERE config_id = %(id)s AND version = 1"
    write_as_app(app_url, f"UPDATE {VERSIONS} SET encrypted_credentials = NULL {where}", id=cfg.id)
    _refused(
        app_url,
        f"UPDATE {VERSIONS} SET encrypted_credentials = %(e)s {where}",
        "may change only with a new version",
        e=kept["encrypted_credentials"],
        id=cfg.id,
    )
    _refused(
        app_url,
        f"UPDATE {VERSIONS} SET version = 7 {where}",
        "its key may not change",
        id=cfg.id,
    )


def test_a_token_row_restored_at_an_older_version_is_refused(
    vault: Vault, app_url: str, owner_engine: sa.Engine
) -> None:
    cfg = vault.create_config("t_a", type="smtp", name="OAuth", config=OAUTH)
    vault.store_oauth_token("t_a", cfg.id, access_token="access-1", refresh_token="refresh-1")
    old = _row(owner_engine, TOKENS, "config_id = :id", id=cfg.id)
    assert vault.store_oauth_token("t_a", cfg.id, access_token="access-2") == 2
    _refused(
        app_url,
        f"UPDATE {TOKENS} SET version = %(v)s, encrypted_access_token = %(a)s, "
        "encrypted_refresh_token = %(r)s WHERE config_id = %(id)s",
        "version may not go down",
        v=old["version"],
        a=old["encrypted_access_token"],
        r=old["encrypted_refresh_token"],
        id=cfg.id,
    )
    token: Any = vault.load_oauth_token("t_a", cfg.id)
    assert token.access_token.get_secret_value() == "access-2"


def test_a_deleted_grant_is_never_inserted_again_and_a_new_grant_gets_a_new_id(
    vault: Vault, app_url: str, owner_engine: sa.Engine
) -> None:
    cfg = vault.create_config("t_a", type="smtp", name="OAuth", config=OAUTH)
    vault.store_oauth_token("t_a", cfg.id, access_token="grant-1", refresh_token="r1")
    old = _row(owner_engine, TOKENS, "config_id = :id", id=cfg.id)
    assert vault.delete_oauth_token("t_a", cfg.id)
    columns = ", ".join(old)
    values = ", ".join(f"%({c})s" for c in old)
    _refused(
        app_url,
        f"INSERT INTO {TOKENS} ({columns}) VALUES ({values})",
        "was deleted; its id is never used again",
        **old,
    )
    # A new grant: a new row id, stored, refreshed by a new store, and deleted again.
    assert vault.store_oauth_token("t_a", cfg.id, access_token="grant-2", refresh_token="r2") == 1
    assert vault.store_oauth_token("t_a", cfg.id, access_token="grant-2b") == 2
    new = _row(owner_engine, TOKENS, "config_id = :id", id=cfg.id)
    assert new["id"] != old["id"]
    # Nor may the new row take the old id.
    _refused(
        app_url,
        f"UPDATE {TOKENS} SET id = %(old)s WHERE config_id = %(id)s",
        "its key may not change",
        old=old["id"],
        id=cfg.id,
    )
    token: Any = vault.load_oauth_token("t_a", cfg.id)
    assert token.access_token.get_secret_value() == "grant-2b"
    assert vault.delete_oauth_token("t_a", cfg.id)


def test_rows_deleted_with_their_tenant_are_never_inserted_again(
    vault: Vault, app_url: str, owner_engine: sa.Engine
) -> None:
    """The application may delete its tenant (every tenantvault row goes with it, by
    cascade) and make it again; the old config and token rows stay refused."""
    cfg = vault.create_config("t_a", type="smtp", name="OAuth", config=OAUTH, credentials=None)
    vault.store_oauth_token("t_a", cfg.id, access_token="grant-1")
    config = _row(owner_engine, CONFIGS, "id = :id", id=cfg.id)
    token = _row(owner_engine, TOKENS, "config_id = :id", id=cfg.id)
    with owner_engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM dripiq_app.tenants WHERE id = 't_a'"))
        connection.execute(sa.text("INSERT INTO dripiq_app.tenants (id, name) VALUES ('t_a', 'A')"))
    for table, row in ((CONFIGS, config), (TOKENS, token)):
        columns = ", ".join(row)
        values = ", ".join(f"%({c})s" for c in row)
        params = {
            k: psycopg.types.json.Jsonb(v) if isinstance(v, dict) else v for k, v in row.items()
        }
        _refused(
            app_url,
            f"INSERT INTO {table} ({columns}) VALUES ({values})",
            "was deleted; its id is never used again",
            **params,
        )
    again = vault.create_config("t_a", type="smtp", name="OAuth", config=OAUTH)
    assert vault.store_oauth_token("t_a", again.id, access_token="grant-2") == 1
