"""The audit log against real PostgreSQL (application role, owner, migrator) and OpenBao:
every sensitive operation leaves one event in its own transaction, the chains are
tamper-evident, the table is append-only for everyone, partitions are closed to the
application role, and retention keeps the chains verifiable."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tenantvault import InvalidInputError, RefreshedToken, Vault, cli
from tenantvault.audit.chain import Head, add_partitions, prune_audit, verify_audit
from tenantvault.db.session import set_tenant
from tenantvault.errors import AuditChainBroken, AuditError
from tenantvault.settings import Settings
from tests.rotation_support import SMTP, add_tenants

SECRET = "pa55-w0rd-never-logged"


def _events(owner_engine: sa.Engine, tenant: str = "t_a") -> list[Any]:
    with owner_engine.connect() as connection:
        return connection.execute(
            sa.text(
                "SELECT seq, action, actor, target_id, details::text AS details, hash "
                "FROM dripiq_app.audit_events "
                "WHERE tenant_id = :t ORDER BY seq"
            ),
            {"t": tenant},
        ).all()


def _count(owner_engine: sa.Engine) -> int:
    with owner_engine.connect() as connection:
        return int(
            connection.execute(sa.text("SELECT count(*) FROM dripiq_app.audit_events")).scalar_one()
        )


def _tamper(owner_engine: sa.Engine, statement: str) -> None:
    """As the table owner, with the append-only trigger switched off (as an attacker could)."""
    with owner_engine.begin() as connection:
        connection.exec_driver_sql(
            "ALTER TABLE dripiq_app.audit_events DISABLE TRIGGER trg_audit_events_append_only"
        )
        connection.exec_driver_sql(statement)
        connection.exec_driver_sql(
            "ALTER TABLE dripiq_app.audit_events ENABLE TRIGGER trg_audit_events_append_only"
        )


@pytest.fixture
def history(vault: Vault) -> str:
    """A config taken through every audited change; returns its id."""
    cfg = vault.create_config(
        "t_a", type="smtp", name="R", config=SMTP, credentials={"password": SECRET}, actor="user:1"
    )
    vault.store_credentials(
        "t_a", cfg.id, {"password": SECRET + "2"}, actor="user:2", reason="rotated"
    )
    vault.update_config("t_a", cfg.id, name="R2")
    vault.rollback_config("t_a", cfg.id, 1)
    vault.set_default("t_a", cfg.id)
    vault.deactivate_config("t_a", cfg.id)
    vault.delete_config("t_a", cfg.id, actor="user:3")
    vault.restore_config("t_a", cfg.id)
    graph = vault.create_config(
        "t_a",
        type="sendgrid",
        name="S",
        config={},
        credentials={"api_key": "SG.abcdefghijk.lmnopqrstuvwxyz0123456789"},
    )
    vault.store_oauth_token(
        "t_a",
        graph.id,
        access_token="access-token-one",
        refresh_token="refresh-token-one",
        expires_at=datetime.now(UTC),
    )
    vault.refresh_oauth_token(
        "t_a",
        graph.id,
        lambda t: RefreshedToken("access-token-two", datetime.now(UTC) + timedelta(hours=1)),
    )
    vault.delete_oauth_token("t_a", graph.id)
    return cfg.id


def test_every_sensitive_operation_leaves_one_event_and_none_holds_a_secret(
    history: str, owner_engine: sa.Engine, operator_db: Any
) -> None:
    events = _events(owner_engine)
    assert [e.action for e in events] == [
        "dek.created",
        "config.created",
        "config.credentials_stored",
        "config.updated",
        "config.rolled_back",
        "config.default_set",
        "config.deactivated",
        "config.deleted",
        "config.restored",
        "config.created",
        "token.stored",
        "token.refreshed",
        "token.deleted",
    ]
    assert [e.seq for e in events] == list(range(1, 14))
    assert events[1].actor == "user:1"
    assert events[7].actor == "user:3"
    assert events[2].target_id == history
    for secret in (
        SECRET,
        "SG.abcdefghijk.lmnopqrstuvwxyz0123456789",
        "access-token-one",
        "access-token-two",
        "refresh-token-one",
    ):
        assert all(secret not in str(tuple(e)) for e in events)
    report = verify_audit(operator_db)
    assert report.ok
    assert (report.tenants, report.events) == (1, 13)


def test_load_auditing_is_off_by_default_and_records_reveals_when_on(
    vault: Vault, owner_engine: sa.Engine, app_settings: Settings, provider: Any
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="R", config=SMTP, credentials={"password": SECRET}
    )
    before = _count(owner_engine)
    vault.load_credentials("t_a", cfg.id)
    assert _count(owner_engine) == before
    audited = Vault.from_settings(
        app_settings.model_copy(update={"audit_loads": True}), key_provider=provider
    )
    try:
        audited.load_credentials("t_a", cfg.id, actor="worker:7")
    finally:
        audited.dispose()
    last = _events(owner_engine)[-1]
    assert (last.action, last.actor, last.target_id) == ("credentials.revealed", "worker:7", cfg.id)


@pytest.mark.parametrize(
    ("tampering", "seqs", "problem"),
    [
        (
            "UPDATE dripiq_app.audit_events SET actor = 'user:evil' WHERE tenant_id = 't_a' AND seq = 3",
            [3],
            "edited",
        ),
        (
            "UPDATE dripiq_app.audit_events SET details = '{\"version\": 9}' WHERE tenant_id = 't_a' AND seq = 5",
            [5],
            "edited",
        ),
        ("DELETE FROM dripiq_app.audit_events WHERE tenant_id = 't_a' AND seq = 4", [4], "deleted"),
        (
            # Two rows swapped: three links no longer hold (into 6, into 7, into 8).
            "UPDATE dripiq_app.audit_events SET seq = CASE seq WHEN 6 THEN 7 ELSE 6 END "
            "WHERE tenant_id = 't_a' AND seq IN (6, 7)",
            [6, 7, 8],
            "does not follow",
        ),
        (
            "DELETE FROM dripiq_app.audit_events WHERE tenant_id = 't_a' AND seq = 13",
            [13],
            "missing",
        ),
    ],
    ids=["edit-actor", "edit-details", "delete-middle", "reorder", "delete-last"],
)
def test_tampering_as_the_owner_is_detected_and_the_bad_rows_named(
    history: str,
    owner_engine: sa.Engine,
    operator_db: Any,
    vault: Vault,
    tampering: str,
    seqs: list[int],
    problem: str,
    migrated: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    vault.create_config(
        "t_b", type="smtp", name="other", config=SMTP, credentials={"password": "p"}
    )
    _tamper(owner_engine, tampering)
    report = verify_audit(operator_db)
    assert not report.ok
    assert [(b.tenant_id, b.seq) for b in report.breaks] == [("t_a", seq) for seq in seqs]
    assert problem in report.breaks[0].problem
    seq = seqs[0]
    # The CLI names it too, and exits 5.
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", migrated.database_url.get_secret_value())
    assert cli.main(["audit", "verify"]) == cli.EXIT_AUDIT_BROKEN
    assert f"BROKEN tenant t_a seq {seq}" in capsys.readouterr().out
    assert cli.main(["audit", "verify", "--tenant", "t_b"]) == cli.EXIT_OK


def test_the_table_is_append_only_for_the_app_role_the_owner_and_truncate(
    history: str, owner_engine: sa.Engine, app_url: str
) -> None:
    with psycopg.connect(app_url) as app:
        app.execute("SELECT set_config('tenantvault.tenant_id', 't_a', true)")
        for statement in (
            "UPDATE dripiq_app.audit_events SET actor = 'x'",
            "DELETE FROM dripiq_app.audit_events",
            "TRUNCATE dripiq_app.audit_events",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute(statement)
            app.rollback()
            app.execute("SELECT set_config('tenantvault.tenant_id', 't_a', true)")
        # Partitions are closed to it: the parent's row-level security does not apply there.
        partition = f"dripiq_app.audit_events_{datetime.now(UTC):%Y_%m}"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute(f"SELECT count(*) FROM {partition}")
    with owner_engine.connect() as owner:
        for statement in (
            "UPDATE dripiq_app.audit_events SET actor = 'x'",
            "DELETE FROM dripiq_app.audit_events",
            "TRUNCATE dripiq_app.audit_events",
            f"TRUNCATE {partition}",
            f"DELETE FROM {partition}",
        ):
            with pytest.raises(sa.exc.DBAPIError, match="append-only"):
                owner.exec_driver_sql(statement)
            owner.rollback()
    assert _count(owner_engine) == 13


def test_an_event_cannot_be_backdated(vault: Vault, app_url: str) -> None:
    with psycopg.connect(app_url) as app:
        app.execute("SELECT set_config('tenantvault.tenant_id', 't_a', true)")
        with pytest.raises(psycopg.errors.RaiseException, match="set by the database"):
            app.execute(
                "INSERT INTO dripiq_app.audit_events (tenant_id, action, occurred_at, prev_hash, hash) "
                "VALUES ('t_a', 'config.created', timezone('utc', now()) - interval '1 day', '', '')"
            )


def test_a_failed_operation_or_a_rolled_back_transaction_leaves_no_event(
    vault: Vault, owner_engine: sa.Engine
) -> None:
    vault.create_config("t_a", type="smtp", name="R", config=SMTP, credentials={"password": SECRET})
    before = _count(owner_engine)
    with pytest.raises(InvalidInputError):
        vault.create_config(
            "t_a", type="smtp", name="R", config=SMTP, credentials={"password": "p"}
        )  # name taken
    with pytest.raises(InvalidInputError):
        vault.create_config(
            "t_a", type="smtp", name="X", config={**SMTP, "port": 0}, credentials={"password": "p"}
        )
    assert _count(owner_engine) == before
    with Session(vault.engine) as session:
        session.begin()
        set_tenant(session.connection(), "t_a")
        vault.create_config(
            "t_a",
            type="smtp",
            name="Y",
            config=SMTP,
            credentials={"password": "p"},
            session=session,
        )
        session.rollback()
    assert _count(owner_engine) == before
    with owner_engine.connect() as connection:
        names = (
            connection.execute(sa.text("SELECT name FROM dripiq_app.email_provider_configs"))
            .scalars()
            .all()
        )
    assert names == ["R"]


def test_concurrent_writers_keep_every_chain_valid(
    vault: Vault, owner_engine: sa.Engine, operator_db: Any
) -> None:
    tenants = ["t_a", "t_b", "t_c"]
    add_tenants(owner_engine, ["t_c"])
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for n in range(6):
                tenant = tenants[(worker + n) % len(tenants)]
                cfg = vault.create_config(
                    tenant,
                    type="smtp",
                    name=f"w{worker}-{n}",
                    config=SMTP,
                    credentials={"password": "p"},
                )
                vault.store_credentials(tenant, cfg.id, {"password": "q"})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    report = verify_audit(operator_db)
    assert report.ok, report.breaks
    # 8 writers x 6 configs x (created + credentials) + one first key per tenant.
    assert report.events == 8 * 6 * 2 + 3
    for tenant in tenants:
        seqs = [e.seq for e in _events(owner_engine, tenant)]
        assert seqs == list(range(1, len(seqs) + 1))


def test_retention_drops_whole_months_and_the_chain_verifies_from_the_first_kept_event(
    vault: Vault, owner_engine: sa.Engine, operator_db: Any, provider: Any
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="R", config=SMTP, credentials={"password": "p"}
    )
    vault.store_credentials("t_a", cfg.id, {"password": "q"})
    dropped_events = _count(owner_engine)
    # Three months on, keeping one: this month and next go (nothing has happened since).
    later = datetime.now(UTC) + timedelta(days=93)
    dry = prune_audit(operator_db, keep_months=1, now=later, dry_run=True)
    assert dry.events_dropped == dropped_events
    assert _count(owner_engine) == dropped_events
    with pytest.raises(AuditError, match="needs the key provider"):
        prune_audit(operator_db, keep_months=1, now=later)
    report = prune_audit(operator_db, keep_months=1, now=later, mac=provider.mac)
    this_month = f"audit_events_{datetime.now(UTC):%Y_%m}"
    assert this_month in report.dropped
    assert report.events_dropped == dropped_events
    assert _count(owner_engine) == 0
    assert add_partitions(operator_db, 24) >= 1  # this month is back, empty
    vault.store_credentials("t_a", cfg.id, {"password": "r"})
    verified = verify_audit(operator_db, check_mac=provider.verify_mac)
    assert verified.ok, verified.breaks
    assert [e.seq for e in _events(owner_engine)] == [dropped_events + 1]
    # Without the key provider, where the chain now starts cannot be vouched for.
    assert [b.seq for b in verify_audit(operator_db).breaks] == [dropped_events + 1]
    # Deleting the first kept event is still caught.
    vault.store_credentials("t_a", cfg.id, {"password": "s"})
    _tamper(owner_engine, f"DELETE FROM dripiq_app.audit_events WHERE seq = {dropped_events + 1}")
    broken = verify_audit(operator_db, check_mac=provider.verify_mac).breaks
    assert [b.seq for b in broken] == [dropped_events + 1]


def test_retention_refuses_to_cut_a_chain_whose_events_cross_the_month_out_of_order(
    owner_engine: sa.Engine, operator_db: Any, app_settings: Settings
) -> None:
    # Two events that raced across a month's end: seq 1 got the later time (kept),
    # seq 2 the earlier one (in the month retention would drop). Written as the owner
    # with the chain trigger off, hashes from the database's own digest.
    this_month = datetime.now(UTC).date().replace(day=1)
    next_month = (this_month + timedelta(days=32)).replace(day=1)
    month_after = (next_month + timedelta(days=32)).replace(day=1)
    with owner_engine.begin() as connection:
        connection.exec_driver_sql(
            "ALTER TABLE dripiq_app.audit_events DISABLE TRIGGER trg_audit_events_chain"
        )
        previous = ""
        for seq, when in (
            (1, datetime.combine(next_month, datetime.min.time())),
            (2, datetime.now(UTC).replace(tzinfo=None)),
        ):
            previous = connection.execute(
                sa.text(
                    "INSERT INTO dripiq_app.audit_events (tenant_id, seq, occurred_at, action, prev_hash, hash) "
                    "SELECT 't_a', :seq, :at, 'config.created', :prev, dripiq_app.tenantvault_audit_digest("
                    ":prev, 't_a', :seq, :at, NULL, 'config.created', NULL, NULL, '{}'::jsonb) RETURNING hash"
                ),
                {"seq": seq, "at": when, "prev": previous},
            ).scalar_one()
        connection.execute(
            sa.text(
                "INSERT INTO dripiq_app.audit_chain_heads (tenant_id, seq, hash) VALUES ('t_a', 2, :h)"
            ),
            {"h": previous},
        )
        connection.exec_driver_sql(
            "ALTER TABLE dripiq_app.audit_events ENABLE TRIGGER trg_audit_events_chain"
        )
    assert verify_audit(operator_db).ok
    later = datetime.combine(month_after, datetime.min.time(), tzinfo=UTC) + timedelta(days=14)
    with pytest.raises(AuditError, match="tenants t_a cross"):
        prune_audit(operator_db, keep_months=1, now=later, mac=lambda _: "unused")
    assert _count(owner_engine) == 2
    assert verify_audit(operator_db).ok


def test_verify_raises_no_false_alarm_while_writers_append(
    vault: Vault, owner_engine: sa.Engine, operator_db: Any
) -> None:
    tenants = ["t_a", "t_b"]
    stop = threading.Event()
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        n = 0
        try:
            while not stop.is_set():
                tenant = tenants[(worker + n) % len(tenants)]
                vault.create_config(  # OAuth: a config row alone, no password
                    tenant,
                    type="smtp",
                    name=f"v{worker}-{n}",
                    config={**SMTP, "auth_type": "oauth2"},
                    credentials=None,
                )
                n += 1
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for writer in writers:
        writer.start()
    try:
        reports = [verify_audit(operator_db) for _ in range(10)]
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    assert not errors
    assert [r.breaks for r in reports] == [[]] * 10
    assert reports[-1].events > reports[0].events  # the writers did write meanwhile


# --- the owner cannot forge the log unnoticed ---


def test_a_replaced_digest_function_does_not_hide_an_edited_event(
    history: str, owner_engine: sa.Engine, operator_db: Any, vault: Vault
) -> None:
    # Odd characters in what is hashed: the Python encoding must equal the trigger's.
    vault.create_config(
        "t_a",
        type="smtp",
        name="odd",
        config=SMTP,
        credentials={"password": "p"},
        actor='user:"é"\\ñ 日本 x',
    )
    assert verify_audit(operator_db).ok
    with owner_engine.begin() as connection:
        # The owner makes the database's digest answer the stored hash, whatever the row.
        connection.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION dripiq_app.tenantvault_audit_digest("
            "prev_hash text, tenant_id text, seq bigint, occurred_at timestamp, actor text, "
            "action text, target_type text, target_id text, details jsonb) RETURNS text "
            "LANGUAGE sql STABLE AS $$ SELECT e.hash FROM dripiq_app.audit_events e "
            "WHERE e.tenant_id = $2 AND e.seq = $3 $$"
        )
    _tamper(
        owner_engine,
        "UPDATE dripiq_app.audit_events SET actor = 'nobody' WHERE tenant_id = 't_a' AND seq = 2",
    )
    report = verify_audit(operator_db)
    assert [(b.tenant_id, b.seq) for b in report.breaks] == [("t_a", 2)]
    assert "edited" in report.breaks[0].problem


def test_a_moved_start_marker_is_caught_without_its_mac(
    history: str, owner_engine: sa.Engine, operator_db: Any, provider: Any
) -> None:
    events = _events(owner_engine)
    # The owner deletes the first two events and claims retention cut them.
    _tamper(
        owner_engine, "DELETE FROM dripiq_app.audit_events WHERE tenant_id = 't_a' AND seq <= 2"
    )
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.audit_chain_heads SET first_seq = 3, anchor_hash = :h, "
                "anchor_mac = :m WHERE tenant_id = 't_a'"
            ),
            {"h": events[1].hash, "m": "vault:v1:forged"},
        )
    report = verify_audit(operator_db, check_mac=provider.verify_mac)
    assert [(b.tenant_id, b.seq) for b in report.breaks] == [("t_a", 3)]
    assert "not authenticated" in report.breaks[0].problem


def test_events_cut_from_the_end_are_caught_by_the_heads_kept_outside(
    history: str,
    owner_engine: sa.Engine,
    operator_db: Any,
    migrated: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", migrated.database_url.get_secret_value())
    kept = tmp_path / "heads.json"
    assert cli.main(["audit", "verify", "--heads-out", str(kept)]) == cli.EXIT_OK
    assert oct(kept.stat().st_mode & 0o777) == "0o600"
    events = _events(owner_engine)
    last = events[-1]
    # The owner drops the last event and sets the head back: the chain is consistent.
    _tamper(
        owner_engine,
        f"DELETE FROM dripiq_app.audit_events WHERE tenant_id = 't_a' AND seq = {last.seq}",
    )
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.audit_chain_heads SET seq = :s, hash = :h "
                "WHERE tenant_id = 't_a'"
            ),
            {"s": events[-2].seq, "h": events[-2].hash},
        )
    assert verify_audit(operator_db).ok  # nothing inside the database shows it
    assert cli.main(["audit", "verify", "--expect-heads", str(kept)]) == cli.EXIT_AUDIT_BROKEN
    report = verify_audit(operator_db, expected_heads={"t_a": Head(last.seq, last.hash)})
    assert [(b.tenant_id, b.seq) for b in report.breaks] == [("t_a", last.seq)]
    assert "cut from its end" in report.breaks[0].problem


def test_a_row_holding_what_tenantvault_never_writes_is_reported_not_a_crash(
    history: str, owner_engine: sa.Engine, operator_db: Any
) -> None:
    _tamper(
        owner_engine,
        "UPDATE dripiq_app.audit_events SET details = '{\"version\": 1.5e-7}' "
        "WHERE tenant_id = 't_a' AND seq = 3",
    )
    report = verify_audit(operator_db)
    assert [(b.tenant_id, b.seq) for b in report.breaks] == [("t_a", 3)]
    assert "edited" in report.breaks[0].problem


# --- issue 21, item 7: the chain cannot be laundered ---


def test_verify_reports_every_break_and_where_each_chain_really_ends(
    history: str, owner_engine: sa.Engine, operator_db: Any
) -> None:
    # Three tamperings of one chain, the first of which used to hide the other two.
    _tamper(
        owner_engine,
        "UPDATE dripiq_app.audit_events SET actor = 'user:evil' WHERE tenant_id = 't_a' AND seq = 3",
    )
    _tamper(
        owner_engine,
        "UPDATE dripiq_app.audit_events SET details = '{\"version\": 9}' "
        "WHERE tenant_id = 't_a' AND seq = 8",
    )
    _tamper(
        owner_engine, "DELETE FROM dripiq_app.audit_events WHERE tenant_id = 't_a' AND seq = 11"
    )
    report = verify_audit(operator_db)
    assert [(b.tenant_id, b.seq) for b in report.breaks] == [("t_a", 3), ("t_a", 8), ("t_a", 11)]
    assert ["edited" in b.problem for b in report.breaks] == [True, True, False]
    assert "deleted" in report.breaks[2].problem
    # The head it reports is the chain's last event, not the row before the first break.
    last = _events(owner_engine)[-1]
    assert report.heads["t_a"] == Head(13, last.hash)


def test_numbers_the_application_writes_verify_however_they_are_spelled(
    vault: Vault, app_url: str, operator_db: Any, owner_engine: sa.Engine
) -> None:
    spellings = [
        "1.5",
        "1.50",
        "1e2",
        "1.0E+2",
        "-0",
        "-0.0",
        "0.000",
        "0e5",
        "1.5e-7",
        "1e-20",
        "-3",
        "2.5E+3",
        "1e30",
        "12345678901234567890123456789.0123456789",
    ]
    # As the application's login, as the app (or SQL injected into it) would write them.
    with psycopg.connect(app_url) as app:
        app.execute("SELECT set_config('tenantvault.tenant_id', 't_a', true)")
        for number in spellings:
            app.execute(
                "INSERT INTO dripiq_app.audit_events (tenant_id, action, details, prev_hash, hash) "
                "VALUES ('t_a', 'config.updated', %s::jsonb, '', '')",
                (f'{{"n": {number}, "in": [{number}, {{"x": {number}}}]}}',),
            )
    report = verify_audit(operator_db)
    assert report.ok, report.breaks
    assert report.events == len(spellings)
    # Still bound to the value as stored: 1.5 written as 1.50 is an edit.
    _tamper(
        owner_engine,
        "UPDATE dripiq_app.audit_events SET details = "
        '\'{"n": 1.50, "in": [1.5, {"x": 1.5}]}\' WHERE tenant_id = \'t_a\' AND seq = 1',
    )
    assert [(b.seq, "edited" in b.problem) for b in verify_audit(operator_db).breaks] == [(1, True)]


OLD_MONTH = "dripiq_app.audit_events_2020_01"


def _launder_into_an_old_month(owner_engine: sa.Engine, *, rehash: bool) -> None:
    """What the schema owner may do: make a partition for a long-gone month, turn the
    table's own triggers off, and move t_a's events 1-9 and t_b's whole chain into it
    (an UPDATE of occurred_at moves a row across partitions). With ``rehash`` it also
    recomputes both chains and their heads with the database's digest, so nothing
    inside the database shows it."""
    with owner_engine.begin() as connection:
        connection.exec_driver_sql(
            f"CREATE TABLE {OLD_MONTH} PARTITION OF dripiq_app.audit_events "
            "FOR VALUES FROM ('2020-01-01') TO ('2020-02-01')"
        )
        connection.exec_driver_sql("ALTER TABLE dripiq_app.audit_events DISABLE TRIGGER USER")
        moved = connection.exec_driver_sql(
            "UPDATE dripiq_app.audit_events "
            "SET occurred_at = timestamp '2020-01-15' + seq * interval '1 second' "
            "WHERE (tenant_id = 't_a' AND seq <= 9) OR tenant_id = 't_b'"
        ).rowcount
        assert moved > 9
        if rehash:
            connection.exec_driver_sql(
                """
                DO $$ DECLARE r record; prev text; t text; BEGIN
                  FOREACH t IN ARRAY ARRAY['t_a', 't_b'] LOOP
                    prev := '';
                    FOR r IN SELECT * FROM dripiq_app.audit_events WHERE tenant_id = t
                             ORDER BY seq LOOP
                      UPDATE dripiq_app.audit_events SET prev_hash = prev,
                        hash = dripiq_app.tenantvault_audit_digest(prev, r.tenant_id, r.seq,
                          r.occurred_at, r.actor, r.action, r.target_type, r.target_id,
                          r.details)
                      WHERE tenant_id = t AND seq = r.seq RETURNING hash INTO prev;
                    END LOOP;
                    UPDATE dripiq_app.audit_chain_heads SET hash = prev WHERE tenant_id = t;
                  END LOOP;
                END $$
                """
            )
        connection.exec_driver_sql("ALTER TABLE dripiq_app.audit_events ENABLE TRIGGER USER")


def _prune_cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    migrated: Settings,
    services: Any,
    *extra: str,
) -> tuple[int, str, str]:
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", migrated.database_url.get_secret_value())
    monkeypatch.setenv("VAULT_ADDR", services.vault_addr)
    monkeypatch.setenv("VAULT_TOKEN", services.vault_token)
    code = cli.main(["audit", "prune", "--keep-months", "1", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _nothing_dropped(owner_engine: sa.Engine, events: int) -> None:
    assert _count(owner_engine) == events
    with owner_engine.connect() as connection:
        assert connection.exec_driver_sql(f"SELECT count(*) FROM {OLD_MONTH}").scalar_one() > 9
        markers = connection.exec_driver_sql(
            "SELECT count(*) FROM dripiq_app.audit_chain_heads "
            "WHERE first_seq <> 1 OR anchor_mac IS NOT NULL"
        ).scalar_one()
    assert markers == 0  # no start marker was signed


@pytest.fixture
def two_chains(history: str, vault: Vault, owner_engine: sa.Engine) -> int:
    """t_a's 13 events and t_b's 3; returns how many events there are."""
    cfg = vault.create_config("t_b", type="smtp", name="B", config={**SMTP, "auth_type": "oauth2"})
    vault.update_config("t_b", cfg.id, name="B2")
    return _count(owner_engine)


def test_prune_refuses_to_drop_chain_events_the_owner_moved_into_an_old_month(
    two_chains: int,
    owner_engine: sa.Engine,
    operator_db: Any,
    migrated: Settings,
    services: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _launder_into_an_old_month(owner_engine, rehash=False)
    # The routine prune, as scheduled (no kept heads): it cuts both chains, verifies
    # them first, and refuses.
    code, out, err = _prune_cli(monkeypatch, capsys, migrated, services)
    assert code == cli.EXIT_AUDIT_BROKEN
    assert out == ""
    assert err.startswith("FAILED: audit prune refused: ")
    assert err.count("\n") == 1
    for named in ("tenants t_a, t_b", "edited", "nothing dropped"):
        assert named in err
    _nothing_dropped(owner_engine, two_chains)
    # A dry run says the same, and verify still names the moved events.
    code, _, err = _prune_cli(monkeypatch, capsys, migrated, services, "--dry-run")
    assert (code, err.count("FAILED:")) == (cli.EXIT_AUDIT_BROKEN, 1)
    broken = verify_audit(operator_db).breaks
    assert {(b.tenant_id, b.seq) for b in broken} >= {("t_a", s) for s in range(1, 10)}
    assert {b.tenant_id for b in broken} == {"t_a", "t_b"}


def test_prune_given_the_kept_heads_refuses_a_moved_and_rehashed_chain(
    two_chains: int,
    owner_engine: sa.Engine,
    operator_db: Any,
    provider: Any,
    migrated: Settings,
    services: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
) -> None:
    kept = tmp_path / "heads.json"
    monkeypatch.setenv("TENANTVAULT_DATABASE_URL", migrated.database_url.get_secret_value())
    assert cli.main(["audit", "verify", "--heads-out", str(kept)]) == cli.EXIT_OK
    capsys.readouterr()
    heads = verify_audit(operator_db).heads
    _launder_into_an_old_month(owner_engine, rehash=True)
    assert verify_audit(operator_db).ok  # nothing inside the database shows it
    code, out, err = _prune_cli(
        monkeypatch, capsys, migrated, services, "--expect-heads", str(kept)
    )
    assert (code, out) == (cli.EXIT_AUDIT_BROKEN, "")
    assert err.startswith("FAILED: audit prune refused: ")
    assert err.count("\n") == 1
    for named in ("tenants t_a, t_b", "kept outside", "nothing dropped"):
        assert named in err
    _nothing_dropped(owner_engine, two_chains)
    # The library call refuses the same way, naming every break.
    with pytest.raises(AuditChainBroken) as refused:
        prune_audit(
            operator_db,
            keep_months=1,
            mac=provider.mac,
            check_mac=provider.verify_mac,
            expected_heads=heads,
        )
    assert {b.tenant_id for b in refused.value.breaks} == {"t_a", "t_b"}
    _nothing_dropped(owner_engine, two_chains)


def test_prune_verifies_what_it_cuts_and_then_drops_it(
    two_chains: int, owner_engine: sa.Engine, operator_db: Any, provider: Any, tmp_path: Any
) -> None:
    # Honest chains: the prune verifies both, given their kept heads, and goes ahead.
    report = verify_audit(operator_db)
    later = datetime.now(UTC) + timedelta(days=93)
    pruned = prune_audit(
        operator_db,
        keep_months=1,
        now=later,
        mac=provider.mac,
        check_mac=provider.verify_mac,
        expected_heads=report.heads,
    )
    assert (pruned.events_dropped, pruned.chains_verified) == (two_chains, 2)
    after = verify_audit(operator_db, check_mac=provider.verify_mac, expected_heads=report.heads)
    assert after.ok, after.breaks


def test_a_kept_head_is_checked_when_retention_took_every_event_before_it(
    vault: Vault, owner_engine: sa.Engine, operator_db: Any, provider: Any
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="R", config=SMTP, credentials={"password": "q"}
    )
    later = datetime.now(UTC) + timedelta(days=93)
    prune_audit(
        operator_db, keep_months=1, now=later, mac=provider.mac, check_mac=provider.verify_mac
    )
    assert _count(owner_engine) == 0
    add_partitions(operator_db, 24)
    vault.store_credentials("t_a", cfg.id, {"password": "r"})
    kept = verify_audit(operator_db, check_mac=provider.verify_mac).heads
    # The owner removes the one event since, and sets the head back to the retention start.
    _tamper(owner_engine, "DELETE FROM dripiq_app.audit_events WHERE tenant_id = 't_a'")
    with owner_engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE dripiq_app.audit_chain_heads SET seq = first_seq - 1, hash = anchor_hash"
        )
    assert verify_audit(operator_db, check_mac=provider.verify_mac).ok
    report = verify_audit(operator_db, check_mac=provider.verify_mac, expected_heads=kept)
    assert [(b.tenant_id, b.seq) for b in report.breaks] == [("t_a", kept["t_a"].seq)]
    assert "cut from its end" in report.breaks[0].problem
