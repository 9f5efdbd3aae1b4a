"""Operator claims (migration 0015's claims table): the application's login can neither
take a claim nor hold one up — not with the advisory locks claims used to be — and
each tenant's claim is its own, however its id hashes. Real PostgreSQL (the
application's login and the operator's), real OpenBao."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from tenantvault import Vault
from tenantvault.db.operator import DEK_ROTATION_CLAIM, OperatorDatabase
from tenantvault.rotation.dek import rotate_data_keys
from tenantvault.rotation.kek import rotate_kek
from tenantvault.rotation.shred import shred_tenant
from tenantvault.settings import Settings
from tests.conftest import PGBOUNCER_LANE, Services, fresh_keyring, transit_provider
from tests.rotation_support import key_states, populate

# The advisory lock classes the claims were before migration 0015 (any login may take
# an advisory lock): the DEK rotation's and shred's claim, and the KEK decision's.
OLD_TENANT_CLAIM = 1_953_916_002
OLD_KEK_LOCK = 1_953_916_003
CLAIMS = "dripiq_app.tenantvault_operator_claims"


@pytest.fixture
def quick_operator(migrated: Settings) -> Any:
    """An operator whose statements give up after 3 s (a stalled one fails fast). Behind
    PgBouncer the timeout is the login role's own, which the lane sets to the default
    (tests/conftest.py): there a stall fails after that, the assertions the same."""
    quick = {} if PGBOUNCER_LANE else {"statement_timeout_ms": 3000}
    db = OperatorDatabase.from_settings(migrated.model_copy(update=quick))
    yield db
    db.dispose()


def _app_session(app_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(app_url, autocommit=True)


def test_the_app_login_holding_the_old_claim_locks_stalls_neither_rotation_nor_shred(
    vault: Vault,
    quick_operator: OperatorDatabase,
    provider: Any,
    owner_engine: sa.Engine,
    app_url: str,
) -> None:
    populate(vault, "t_a")
    populate(vault, "t_b")
    with _app_session(app_url) as app:
        # Session locks: held until the connection ends, as an attacker would keep them.
        app.execute(
            "SELECT pg_advisory_lock(%(c)s, hashtext('t_a')), "
            "pg_advisory_lock(%(c)s, hashtext('t_b'))",
            {"c": OLD_TENANT_CLAIM},
        )
        report = rotate_data_keys(quick_operator, fresh_keyring(provider), ["t_a"])
        assert [t.outcome for t in report.tenants] == ["rotated"]
        assert report.ok
        shredded = shred_tenant(quick_operator, "t_b")
        assert shredded.destroyed_versions == [1]
    assert key_states(owner_engine, "t_a") == {1: "retired", 2: "active"}
    assert key_states(owner_engine, "t_b") == {1: "destroyed"}


def test_the_app_login_holding_the_old_kek_lock_does_not_stall_a_kek_rotation(
    app_settings: Settings, services: Services, quick_operator: OperatorDatabase, app_url: str
) -> None:
    own = transit_provider(services, key_name=f"kek-{uuid.uuid4().hex[:8]}")
    built = Vault.from_settings(app_settings, key_provider=own)
    try:
        populate(built, "t_a", configs=1)
    finally:
        built.dispose()
    with _app_session(app_url) as app:
        app.execute("SELECT pg_advisory_lock(%s, 0)", (OLD_KEK_LOCK,))
        report = rotate_kek(quick_operator, own)
    assert report.ok
    assert (report.kek_before, report.kek_after, report.rewrapped) == (1, 2, 1)


def test_the_app_login_cannot_take_read_or_lock_a_claim(app_url: str, migrated: Settings) -> None:
    with psycopg.connect(app_url) as app:
        for statement in (
            f"INSERT INTO {CLAIMS} (job, tenant_id) VALUES ('tenant_keys', 't_a')",
            f"SELECT * FROM {CLAIMS} FOR UPDATE",
            f"LOCK TABLE {CLAIMS} IN ACCESS EXCLUSIVE MODE",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute(statement)
            app.rollback()


def test_two_tenants_whose_hashtext_collides_are_claimed_apart_and_no_row_is_left(
    operator_db: OperatorDatabase, owner_engine: sa.Engine
) -> None:
    with owner_engine.connect() as connection:
        # hashtext is 32 bits: among 300,000 ids about ten pairs collide.
        first, second = connection.execute(
            sa.text(
                "SELECT (array_agg(id ORDER BY id))[1:2] FROM "
                "(SELECT 'tenant-' || n AS id FROM generate_series(1, 300000) n) ids "
                "GROUP BY hashtext(id) HAVING count(*) > 1 ORDER BY 1 LIMIT 1"
            )
        ).scalar_one()
        assert connection.execute(
            sa.text("SELECT hashtext(:a) = hashtext(:b)"), {"a": first, "b": second}
        ).scalar_one()
    with operator_db.claim(DEK_ROTATION_CLAIM, first) as claimed:
        assert claimed
        with operator_db.claim(DEK_ROTATION_CLAIM, second) as other:
            assert other
        with operator_db.claim(DEK_ROTATION_CLAIM, first) as again:
            assert not again
    with operator_db.claim(DEK_ROTATION_CLAIM, first) as after:
        assert after  # released with its transaction
    with owner_engine.connect() as connection:
        assert connection.execute(sa.text(f"SELECT count(*) FROM {CLAIMS}")).scalar_one() == 0
