"""What the facade returns: configs and kept versions as the application sees them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tenantvault.db.models import (
    ConfigChange,
    EmailProviderConfig,
    EmailProviderConfigVersion,
    ProviderType,
)
from tenantvault.vault.providers import CredentialsModel, ProviderConfigModel, parse_config


@dataclass(frozen=True)
class ProviderConfig:
    """A config as the application sees it; ``credentials`` only when asked for."""

    id: str
    tenant_id: str
    type: ProviderType
    name: str
    config: ProviderConfigModel
    is_default: bool
    is_active: bool
    created_at: datetime
    updated_at: datetime
    has_credentials: bool
    version: int
    credentials: CredentialsModel | None = None


@dataclass(frozen=True)
class ConfigVersion:
    """One kept version of a config; ``credentials`` only when asked for."""

    config_id: str
    version: int
    change: ConfigChange
    name: str
    config: ProviderConfigModel
    has_credentials: bool
    actor: str | None
    reason: str | None
    created_at: datetime
    credentials: CredentialsModel | None = None


def config_view(row: EmailProviderConfig, credentials: CredentialsModel | None) -> ProviderConfig:
    return ProviderConfig(
        id=row.id,
        tenant_id=row.tenant_id,
        type=ProviderType(row.type),
        name=row.name,
        config=parse_config(row.type, row.config),
        is_default=row.is_default,
        is_active=row.is_active,
        created_at=row.created_at,
        updated_at=row.updated_at,
        has_credentials=row.encrypted_credentials is not None,
        version=row.version,
        credentials=credentials,
    )


def version_view(
    row: EmailProviderConfigVersion, kind: ProviderType, credentials: CredentialsModel | None
) -> ConfigVersion:
    return ConfigVersion(
        config_id=row.config_id,
        version=row.version,
        change=ConfigChange(row.change),
        name=row.name,
        config=parse_config(kind, row.config),
        has_credentials=row.encrypted_credentials is not None,
        actor=row.actor,
        reason=row.reason,
        created_at=row.created_at,
        credentials=credentials,
    )
