"""Every lookup the application makes is served by an index at a realistic volume
(10k tenants, 100k configs, 100k sender identities, 50k token rows), checked with
EXPLAIN as the application role with row-level security on."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import Executable

from tenantvault.db import queries
from tenantvault.db.models import ProviderType
from tenantvault.db.session import TENANT_SETTING

TENANTS = 10_000
PER_TENANT = 10
BIG_TABLES = {"email_provider_configs", "email_provider_tokens", "email_sender_identities"}
TENANT = "t_04242"
NOW = datetime(2026, 11, 25, tzinfo=UTC)

SEED = f"""
INSERT INTO dripiq_app.tenants (id, name)
  SELECT 't_' || lpad(i::text, 5, '0'), 'Tenant ' || i FROM generate_series(1, {TENANTS}) i;
INSERT INTO dripiq_app.users (id, supabase_id, email)
  SELECT 'u_' || i, 'sb_' || i, 'user' || i || '@example.test' FROM generate_series(1, {TENANTS}) i;
INSERT INTO dripiq_app.email_provider_configs
    (id, tenant_id, type, name, config, is_default, is_active, deleted_at)
  SELECT 'tv_' || t || '_' || n, 't_' || lpad(t::text, 5, '0'),
         (ARRAY['sendgrid', 'smtp', 'microsoft_graph', 'google_workspace'])[1 + n % 4],
         'Config ' || n, jsonb_build_object('n', n), n = 1, n <> 7,
         CASE WHEN n = 10 THEN timezone('utc', now()) END
  FROM generate_series(1, {TENANTS}) t, generate_series(1, {PER_TENANT}) n;
INSERT INTO dripiq_app.email_sender_identities
    (id, tenant_id, user_id, from_email, from_name, domain, sendgrid_sender_id, provider_config_id)
  SELECT 's_' || t || '_' || n, 't_' || lpad(t::text, 5, '0'), 'u_' || t,
         'sender' || n || '@t' || t || '.test', 'Sender', 't' || t || '.test', NULL,
         'tv_' || t || '_' || (1 + n % 5)
  FROM generate_series(1, {TENANTS}) t, generate_series(1, {PER_TENANT}) n;
INSERT INTO dripiq_app.email_provider_tokens
    (tenant_id, config_id, encrypted_access_token, encrypted_refresh_token, expires_at)
  SELECT 't_' || lpad(t::text, 5, '0'), 'tv_' || t || '_' || n, 'tv3.1.c2VhbGVk',
         CASE WHEN n % 2 = 0 THEN 'tv3.1.c2VhbGVk' END,
         timestamp '2026-11-25' + (t * 7 + n) % 1440 * interval '1 minute'
  FROM generate_series(1, {TENANTS}) t, generate_series(1, 5) n;
ANALYZE;
"""


def _statements() -> dict[str, Executable]:
    config_id, sender_id = "tv_4242_3", "s_4242_4"
    return {
        "config by id": queries.config_by_id(TENANT, config_id),
        "configs by ids": queries.configs_by_ids(TENANT, [config_id, "tv_4242_4", "tv_4242_5"]),
        "default config": queries.default_config(TENANT),
        "config by name": queries.config_by_name(TENANT, "Config 3"),
        "active configs": queries.active_configs(TENANT),
        "configs of type": queries.configs_of_type(TENANT, ProviderType.SMTP),
        "config for sender": queries.config_for_sender(TENANT, sender_id),
        "senders of config": queries.senders_of_config(TENANT, config_id),
        "token of config": queries.token_of_config(TENANT, config_id),
        "tokens expiring": queries.tokens_expiring(TENANT, NOW + timedelta(days=1)),
        "delete expired tokens": queries.delete_unrefreshable_expired_tokens(TENANT, NOW),
        "delete config tokens": queries.delete_tokens_of_config(TENANT, config_id),
    }


@pytest.fixture(scope="module")
def loaded(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One database for the module, migrated and loaded; yields a URL for the app role."""
    import uuid

    from tenantvault.ops import migrate
    from tenantvault.settings import load_settings
    from tests.conftest import APP_LOGIN_ROLE, _with_database

    name = f"tv_test_volume_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(services.admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(services.admin_url, name)
    try:
        migrate.upgrade(load_settings(database_url=url))
        with psycopg.connect(url) as owner:
            owner.execute(
                f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_LOGIN_ROLE}') "
                f"THEN CREATE ROLE {APP_LOGIN_ROLE} LOGIN; END IF; END $$"
            )
            owner.execute(f"GRANT tenantvault_app TO {APP_LOGIN_ROLE}")
            owner.execute(SEED.encode())
        with psycopg.connect(url, autocommit=True) as owner:
            owner.execute("VACUUM ANALYZE")
        yield sa.make_url(url).set(username=APP_LOGIN_ROLE).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(services.admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


@pytest.mark.parametrize("name", list(_statements()))
def test_lookup_is_served_by_an_index_at_volume(loaded: str, name: str) -> None:
    statement = _statements()[name]
    sql = str(
        statement.compile(
            dialect=postgresql.dialect(),
            compile_kwargs={"literal_binds": True, "render_postcompile": True},
        )
    )
    with psycopg.connect(loaded, options="-c search_path=dripiq_app") as app, app.transaction():
        app.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, TENANT))
        row = app.execute(f"EXPLAIN (FORMAT JSON) {sql}").fetchone()
        assert row is not None
        plan = row[0][0]["Plan"]
        # The plan must return this tenant's rows: a real query, not an empty shortcut.
        if sql.lstrip().upper().startswith("SELECT"):
            assert app.execute(sql).fetchall() != []
    nodes = [
        n
        for n in _plan_nodes(plan)
        if n.get("Relation Name") in BIG_TABLES and n["Node Type"] != "ModifyTable"
    ]
    assert nodes, f"{name}: no scan of a tenant table in {plan}"
    for node in nodes:
        assert node["Node Type"] in {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}, (
            f"{name}: {node['Node Type']} on {node['Relation Name']}"
        )
    indexes = sorted({n["Index Name"] for n in _plan_nodes(plan) if "Index Name" in n})
    print(f"EXPLAIN {name}: {', '.join(indexes)}")
