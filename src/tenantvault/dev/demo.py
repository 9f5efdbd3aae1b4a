"""The main job end to end, on whatever the settings point at (the dev stack in
``scripts/demo``): two tenants, configs of every provider type, credentials and
OAuth tokens stored and loaded back, and what the database holds shown as
ciphertext. Returns a report; the CLI prints it."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from pydantic import SecretStr

from tenantvault.ops.migrate import migration_engine
from tenantvault.settings import Settings
from tenantvault.vault import Vault

DEMO_LOGIN = "tenantvault_demo_app"


@dataclass
class DemoReport:
    lines: list[str] = field(default_factory=list)
    ok: bool = True

    def say(self, line: str) -> None:
        self.lines.append(line)

    def check(self, what: str, passed: bool) -> None:
        self.ok &= passed
        self.say(f"  [{'ok' if passed else 'FAILED'}] {what}")


def _app_settings(settings: Settings, owner: sa.Engine, tenants: list[str]) -> Settings:
    """Seed the demo tenants as the owner; return settings that log in as the app role."""
    with owner.begin() as connection:
        connection.exec_driver_sql(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{DEMO_LOGIN}') "
            f"THEN CREATE ROLE {DEMO_LOGIN} LOGIN; END IF; END $$"
        )
        connection.exec_driver_sql(f'GRANT "{settings.app_role}" TO {DEMO_LOGIN}')
        for tenant in tenants:
            connection.execute(
                sa.text(
                    f'INSERT INTO "{settings.schema_name}".tenants (id, name) VALUES (:id, :id)'
                ),
                {"id": tenant},
            )
    url = settings.sqlalchemy_url.set(username=DEMO_LOGIN, password=None)
    return settings.model_copy(
        update={"database_url": SecretStr(url.render_as_string(hide_password=False))}
    )


def _revealed(credentials: object, field: str) -> str | None:
    value = getattr(credentials, field, None)
    return value.get_secret_value() if isinstance(value, SecretStr) else None


def run_demo(settings: Settings) -> DemoReport:
    report = DemoReport()
    suffix = secrets.token_hex(3)
    acme, globex = f"demo-acme-{suffix}", f"demo-globex-{suffix}"
    owner = migration_engine(settings)
    vault = Vault.from_settings(_app_settings(settings, owner, [acme, globex]))
    api_key = "SG." + secrets.token_urlsafe(16) + "." + secrets.token_urlsafe(24)
    password = "smtp-" + secrets.token_urlsafe(18)
    client_secret = "graph-" + secrets.token_urlsafe(24)
    access, refresh = "ya29." + secrets.token_urlsafe(32), "1//" + secrets.token_urlsafe(32)

    report.say(f"tenants {acme} and {globex} (application role {DEMO_LOGIN}, RLS on)")
    sendgrid = vault.create_config(
        acme,
        type="sendgrid",
        name="SendGrid",
        config={},
        credentials={"api_key": api_key},
        is_default=True,
    )
    smtp = vault.create_config(
        acme,
        type="smtp",
        name="Office 365",
        config={
            "host": "smtp.office365.com",
            "port": 587,
            "secure": False,
            "auth_type": "login",
            "user": "mailer@acme.example",
        },
        credentials={"password": password},
    )
    graph = vault.create_config(
        globex,
        type="microsoft_graph",
        name="Graph app",
        config={
            "azure_tenant_id": "contoso.onmicrosoft.com",
            "client_id": "0f0e0d0c-0b0a-4908-8706-050403020100",
            "scopes": ["https://graph.microsoft.com/.default"],
            "auth_type": "client_credentials",
        },
        credentials={"client_secret": client_secret},
        is_default=True,
    )
    google = vault.create_config(
        globex,
        type="google_workspace",
        name="Workspace OAuth",
        config={
            "auth_type": "oauth2",
            "project_id": "globex-mail",
            "client_id": "1234.apps",
            "scopes": ["https://mail.google.com/"],
        },
        credentials={"client_secret": "gcs-" + secrets.token_urlsafe(16)},
    )
    vault.store_oauth_token(
        globex,
        google.id,
        access_token=access,
        refresh_token=refresh,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        scopes=["https://mail.google.com/"],
    )
    report.say("stored: 4 configs with credentials, 1 OAuth token; loading them back:")
    loaded = vault.load_credentials(acme, sendgrid.id)
    report.check("SendGrid api_key round trip", _revealed(loaded, "api_key") == api_key)
    loaded_smtp = vault.load_credentials(acme, smtp.id)
    report.check("SMTP password round trip", _revealed(loaded_smtp, "password") == password)
    loaded_graph = vault.get_default_config(globex, with_credentials=True)
    report.check(
        "Graph default config + client_secret",
        loaded_graph.id == graph.id
        and _revealed(loaded_graph.credentials, "client_secret") == client_secret,
    )
    token = vault.load_oauth_token(globex, google.id)
    report.check(
        "OAuth tokens round trip",
        token.access_token is not None
        and token.access_token.get_secret_value() == access
        and token.refresh_token is not None
        and token.refresh_token.get_secret_value() == refresh,
    )
    report.say(f"  what the application sees: {loaded!r}")

    report.say("what the database holds (read as the owner):")
    schema = settings.schema_name
    with owner.connect() as connection:
        connection.exec_driver_sql(f'SET ROLE "{settings.migrator_role}"')
        rows = connection.execute(
            sa.text(
                "SELECT tenant_id, name, encrypted_credentials "
                f'FROM "{schema}".email_provider_configs '
                "WHERE tenant_id IN (:a, :b) ORDER BY tenant_id, name"
            ),
            {"a": acme, "b": globex},
        ).all()
        for tenant, name, sealed in rows:
            report.say(f"  {tenant:<22} {name:<16} {sealed[:48]}...")
        keys = connection.execute(
            sa.text(
                f'SELECT tenant_id, version, wrapped_key FROM "{schema}".tenant_data_keys '
                "WHERE tenant_id IN (:a, :b) ORDER BY tenant_id"
            ),
            {"a": acme, "b": globex},
        ).all()
        for tenant, version, wrapped in keys:
            report.say(f"  {tenant:<22} DEK v{version:<11} {wrapped[:48]}...")
        dump = " ".join(str(r) for r in rows) + " ".join(str(k) for k in keys)
        connection.exec_driver_sql("RESET ROLE")
    report.check(
        "no plaintext secret in those rows",
        not any(s in dump for s in (api_key, password, client_secret)),
    )
    owner.dispose()
    vault.engine.dispose()
    return report
