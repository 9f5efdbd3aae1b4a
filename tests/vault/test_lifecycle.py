"""Config lifecycle against real PostgreSQL and OpenBao: soft delete, restore, purge;
usage counters under concurrent senders in several processes; templates."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tenantvault import InvalidInputError, NotFoundError, Vault
from tenantvault.ops.purge import purge_deleted_configs
from tenantvault.settings import Settings
from tenantvault.vault.templates import TEMPLATES
from tests.conftest import Services, child_environment
from tests.rotation_support import SMTP

SENDGRID_KEY = "SG.abcdefghijk.lmnopqrstuvwxyz0123456789"


def test_a_deleted_config_is_invisible_and_frees_its_name_and_default(vault: Vault) -> None:
    old = vault.create_config(
        "t_a",
        type="smtp",
        name="Relay",
        config=SMTP,
        credentials={"password": "p"},
        is_default=True,
    )
    vault.delete_config("t_a", old.id)
    with pytest.raises(NotFoundError):
        vault.get_config("t_a", old.id)
    with pytest.raises(NotFoundError):
        vault.get_default_config("t_a")
    assert vault.list_active_configs("t_a") == []
    new = vault.create_config(
        "t_a",
        type="smtp",
        name="Relay",
        config=SMTP,
        credentials={"password": "p"},
        is_default=True,
    )
    assert vault.get_default_config("t_a").id == new.id
    with pytest.raises(InvalidInputError, match="restore it under another name with name="):
        vault.restore_config("t_a", old.id)
    restored = vault.restore_config("t_a", old.id, name="Relay (old)")
    assert (restored.name, restored.is_default, restored.version) == ("Relay (old)", False, 1)
    assert vault.load_credentials("t_a", old.id).password.get_secret_value() == "p"  # type: ignore[union-attr]
    assert vault.get_default_config("t_a").id == new.id
    with pytest.raises(NotFoundError, match="no deleted config"):
        vault.restore_config("t_a", old.id)


def test_purge_removes_secrets_tokens_and_history_of_long_deleted_configs_only(
    vault: Vault, operator_db: Any, owner_engine: sa.Engine
) -> None:
    def make(name: str) -> str:
        cfg = vault.create_config(
            "t_a", type="smtp", name=name, config=SMTP, credentials={"password": "p"}
        )
        vault.store_credentials("t_a", cfg.id, {"password": "q"})
        vault.store_oauth_token("t_a", cfg.id, access_token="access-x")
        return cfg.id

    old, recent, live = make("old"), make("recent"), make("live")
    vault.delete_config("t_a", old)
    vault.delete_config("t_a", recent)
    with owner_engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE dripiq_app.email_provider_configs SET deleted_at = deleted_at - interval '40 days' WHERE id = :id"
            ),
            {"id": old},
        )

    def state(config_id: str) -> tuple[Any, ...]:
        with owner_engine.connect() as connection:
            return tuple(
                connection.execute(
                    sa.text(
                        "SELECT (SELECT encrypted_credentials IS NOT NULL FROM dripiq_app.email_provider_configs WHERE id = :id), "
                        "(SELECT count(*) FROM dripiq_app.email_provider_tokens WHERE config_id = :id), "
                        "(SELECT count(*) FROM dripiq_app.email_provider_config_versions WHERE config_id = :id)"
                    ),
                    {"id": config_id},
                ).one()
            )

    dry = purge_deleted_configs(operator_db, older_than=timedelta(days=30), dry_run=True)
    assert [(c.config_id, c.tokens, c.versions) for c in dry.configs] == [(old, 1, 2)]
    assert state(old) == (True, 1, 2)
    report = purge_deleted_configs(operator_db, older_than=timedelta(days=30))
    assert [(c.config_id, c.tokens, c.versions) for c in report.configs] == [(old, 1, 2)]
    assert state(old) == (False, 0, 0)
    assert state(recent) == (True, 1, 2)
    assert state(live) == (True, 1, 2)
    # The row stays as a record; a second run has nothing left to do.
    with owner_engine.connect() as connection:
        assert (
            connection.execute(
                sa.text("SELECT name FROM dripiq_app.email_provider_configs WHERE id = :id"),
                {"id": old},
            ).scalar_one()
            == "old"
        )
        purged = connection.execute(
            sa.text(
                "SELECT count(*) FROM dripiq_app.audit_events WHERE action = 'config.purged' AND target_id = :id"
            ),
            {"id": old},
        ).scalar_one()
    assert purged == 1
    assert purge_deleted_configs(operator_db, older_than=timedelta(days=30)).configs == []


USAGE_CHILD = textwrap.dedent(
    """
    import sys
    from tenantvault import Vault
    from tenantvault.settings import load_settings
    vault = Vault.from_settings(load_settings())
    tenant, config_id, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for n in range(rounds):
        vault.record_usage(tenant, config_id, sent=1, failed=n % 2)
    vault.dispose()
    """
)


def test_usage_counters_are_exact_under_concurrent_senders_in_several_processes(
    vault: Vault, app_settings: Settings, services: Services
) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="R", config=SMTP, credentials={"password": "p"}
    )
    environment = child_environment(app_settings, services)
    processes, rounds = 4, 60
    children = [
        subprocess.Popen(
            [sys.executable, "-c", USAGE_CHILD, "t_a", cfg.id, str(rounds)], env=environment
        )
        for _ in range(processes)
    ]
    assert [child.wait(timeout=120) for child in children] == [0] * processes
    usage = vault.usage("t_a", cfg.id, since=date.today() - timedelta(days=1))
    assert (usage.sent, usage.failed) == (processes * rounds, processes * rounds // 2)
    assert len(usage.days) == 1
    assert usage.last_used_at is not None
    assert datetime.now(UTC) - usage.last_used_at < timedelta(minutes=5)


def test_usage_is_per_day_and_bad_counts_or_unknown_configs_are_refused(vault: Vault) -> None:
    cfg = vault.create_config(
        "t_a", type="smtp", name="R", config=SMTP, credentials={"password": "p"}
    )
    monday = datetime(2026, 11, 23, 9, tzinfo=UTC)
    vault.record_usage("t_a", cfg.id, sent=5, now=monday)
    vault.record_usage("t_a", cfg.id, sent=2, failed=1, now=monday + timedelta(hours=3))
    vault.record_usage("t_a", cfg.id, sent=1, now=monday + timedelta(days=1))
    usage = vault.usage("t_a", cfg.id, since=monday.date())
    assert [(d.day, d.sent, d.failed) for d in usage.days] == [
        (monday.date(), 7, 1),
        (monday.date() + timedelta(days=1), 1, 0),
    ]
    assert usage.days[0].last_used_at == monday + timedelta(hours=3)
    assert vault.usage("t_a", cfg.id, since=monday.date() + timedelta(days=1)).sent == 1
    for bad in ({"sent": -1}, {"sent": True}, {"sent": 0, "failed": 0}, {"sent": 1.5}):
        with pytest.raises(InvalidInputError, match=r"sent|failed"):
            vault.record_usage("t_a", cfg.id, **bad)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        vault.record_usage("t_a", "tvnosuchconfig", sent=1)
    with pytest.raises(NotFoundError):
        vault.record_usage("t_b", cfg.id, sent=1)  # another tenant's config


FILL_INS: dict[str, tuple[dict[str, Any], Any]] = {
    "sendgrid": ({}, {"api_key": SENDGRID_KEY}),
    "google_workspace_smtp_relay": ({"user": "mailer@acme.example"}, {"password": "pw"}),
    "microsoft_365_smtp": ({"user": "mailer@acme.example"}, None),
    "microsoft_graph_app": (
        {
            "azure_tenant_id": "contoso.onmicrosoft.com",
            "client_id": "0f0e0d0c-0b0a-4908-8706-050403020100",
        },
        {"client_secret": "cs"},
    ),
    "google_workspace_api": (
        {
            "project_id": "acme-mail",
            "client_email": "svc@acme-mail.iam.gserviceaccount.com",
            "delegated_user": "ceo@acme.example",
        },
        {"private_key": "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"},
    ),
}


@pytest.mark.parametrize("key", sorted(TEMPLATES))
def test_each_template_with_its_fill_ins_makes_a_valid_config(vault: Vault, key: str) -> None:
    config, credentials = FILL_INS[key]
    made = vault.create_config_from_template(
        "t_a", key, name=key, config=config, credentials=credentials
    )
    assert made.type == TEMPLATES[key].type
    stored = made.config.model_dump(mode="json", exclude_none=True)
    for field, value in TEMPLATES[key].config.items():
        expected = dict(value) if isinstance(value, dict) else value
        if field == "authority_url":
            assert stored[field].rstrip("/") == expected
        elif field == "tls":
            assert {k: stored[field][k] for k in expected} == expected
        else:
            assert stored[field] == expected
    assert vault.list_config_versions("t_a", made.id)[0].reason == f"from template {key}"


def test_templates_validate_like_any_config_and_name_the_field(vault: Vault) -> None:
    with pytest.raises(InvalidInputError, match=r"config\.user"):
        vault.create_config_from_template("t_a", "google_workspace_smtp_relay", name="x")
    with pytest.raises(InvalidInputError, match=r"config\.port"):
        vault.create_config_from_template(
            "t_a",
            "google_workspace_smtp_relay",
            name="x",
            config={"user": "u@a.example", "port": 70000},
        )
    with pytest.raises(InvalidInputError, match="template: must be one of"):
        vault.create_config_from_template("t_a", "mailchimp", name="x")
    # Overrides merge into nested settings without dropping the template's others.
    made = vault.create_config_from_template(
        "t_a",
        "google_workspace_smtp_relay",
        name="x",
        config={"user": "u@a.example", "tls": {"ciphers": "HIGH"}},
        credentials={"password": "p"},
    )
    assert made.config.tls.reject_unauthorized is True  # type: ignore[union-attr]
    assert made.config.tls.ciphers == "HIGH"  # type: ignore[union-attr]
    assert vault.list_active_configs("t_a")[0].name == "x"
