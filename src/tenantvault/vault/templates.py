"""Built-in configuration templates: the non-secret settings of common setups, pre-filled.

A template is a starting point, not a config: ``Vault.create_config_from_template``
merges the caller's fields over it and validates the result like any config, so
a template can never produce something ``create_config`` would refuse. Secrets
are never part of a template.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tenantvault.db.models import ProviderType
from tenantvault.errors import InvalidInputError


@dataclass(frozen=True)
class ConfigTemplate:
    """Pre-filled non-secret config for one kind of setup; ``fill_in`` lists what the
    caller still has to give (config fields, then credentials fields)."""

    key: str
    type: ProviderType
    title: str
    config: Mapping[str, Any]
    fill_in: tuple[str, ...] = field(default=())


def _frozen(value: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(value)


TEMPLATES: Mapping[str, ConfigTemplate] = MappingProxyType(
    {
        t.key: t
        for t in (
            ConfigTemplate(
                "sendgrid",
                ProviderType.SENDGRID,
                "SendGrid (API key)",
                _frozen({}),
                ("credentials.api_key",),
            ),
            ConfigTemplate(
                "google_workspace_smtp_relay",
                ProviderType.SMTP,
                "Google Workspace SMTP relay (smtp-relay.gmail.com, STARTTLS)",
                _frozen(
                    {
                        "host": "smtp-relay.gmail.com",
                        "port": 587,
                        "secure": False,
                        "auth_type": "login",
                        "tls": {"reject_unauthorized": True},
                    }
                ),
                ("config.user", "credentials.password"),
            ),
            ConfigTemplate(
                "microsoft_365_smtp",
                ProviderType.SMTP,
                "Microsoft 365 SMTP AUTH (smtp.office365.com, STARTTLS, OAuth2)",
                _frozen(
                    {
                        "host": "smtp.office365.com",
                        "port": 587,
                        "secure": False,
                        "auth_type": "oauth2",
                        "tls": {"reject_unauthorized": True},
                    }
                ),
                ("config.user", "store_oauth_token(...)"),
            ),
            ConfigTemplate(
                "microsoft_graph_app",
                ProviderType.MICROSOFT_GRAPH,
                "Microsoft Graph, app-only (client credentials)",
                _frozen(
                    {
                        "auth_type": "client_credentials",
                        "scopes": ["https://graph.microsoft.com/.default"],
                        "authority_url": "https://login.microsoftonline.com",
                    }
                ),
                ("config.azure_tenant_id", "config.client_id", "credentials.client_secret"),
            ),
            ConfigTemplate(
                "google_workspace_api",
                ProviderType.GOOGLE_WORKSPACE,
                "Google Workspace Gmail API, service account with domain-wide delegation",
                _frozen(
                    {
                        "auth_type": "service_account",
                        "scopes": ["https://www.googleapis.com/auth/gmail.send"],
                    }
                ),
                (
                    "config.project_id",
                    "config.client_email",
                    "config.delegated_user",
                    "credentials.private_key",
                ),
            ),
        )
    }
)


def template(key: str) -> ConfigTemplate:
    """The built-in template ``key``.

    Raises:
        InvalidInputError: no such template (the message lists the ones there are).
    """
    found = TEMPLATES.get(key) if isinstance(key, str) else None
    if found is None:
        raise InvalidInputError(f"template: must be one of {', '.join(sorted(TEMPLATES))}")
    return found


def merged_config(base: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``overrides`` over ``base``, nested objects merged key by key (lists replaced)."""
    result: dict[str, Any] = {
        k: dict(v) if isinstance(v, Mapping) else (list(v) if isinstance(v, list) else v)
        for k, v in base.items()
    }
    for key, value in (overrides or {}).items():
        current = result.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            result[key] = merged_config(current, value)
        else:
            result[key] = value
    return result
